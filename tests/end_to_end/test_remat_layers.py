"""Rematerialized layers (`AutoLayerOption(remat_layer=True)`, `ManualLayerOption(...)`):
pipelines and ShardParallel equal serial jax.jit, the recomputation survives into the traced
graph, and the predicted activation saving matches XLA's compiled memory.

Tolerance rtol 1e-4, as in test_pipeline.py: gradients are accumulated over micro-batches in a
different order.
"""

import sys
from pathlib import Path

import jax
import optax
import pytest

import alpa_lite
from alpa_lite.config import (AutoLayerOption, ManualLayerOption, ManualStageOption,
                              PipeshardParallel, ShardParallel, UniformStageOption)
from alpa_lite.errors import InvalidConfigError
from alpa_lite.inter_op import pricing
from alpa_lite.testing import assert_trees_close

from tiny_models import make_mlp, mse_step, run_steps

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from bench_memory_model import build  # noqa: E402  (the benchmark's GPT: one definition)


def _check(method, manual=False):
    state, batch = make_mlp(32, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9),
                            manual_boundaries=manual)
    p = alpa_lite.parallelize(mse_step, method=method)
    actual_state, actual_losses = run_steps(p, state, batch)
    expected_state, expected_losses = run_steps(jax.jit(mse_step), state, batch)
    assert_trees_close(actual_losses, expected_losses, rtol=1e-4, atol=1e-5)
    assert_trees_close(actual_state.params, expected_state.params, rtol=1e-4, atol=1e-5)
    assert_trees_close(actual_state.opt_state, expected_state.opt_state, rtol=1e-4, atol=1e-5)
    return p.get_executable(state, batch).graph


def _recomputed(graph) -> tuple[int, int]:
    """(remat barriers, matmuls) of a traced step graph."""
    names = [n.name for n in graph.nodes]
    return sum(n == "optimization_barrier" for n in names), names.count("dot_general")


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("layers", ["auto", "manual"])
def test_remat_pipeline_matches_serial(layers, schedule):
    def option(remat):
        return (ManualLayerOption(remat_layer=remat) if layers == "manual"
                else AutoLayerOption(layer_num=4, remat_layer=remat))

    def method(remat):
        return PipeshardParallel(num_micro_batches=2, layer_option=option(remat),
                                 stage_option=UniformStageOption(num_stages=2),
                                 schedule=schedule)

    graph = _check(method(True), manual=layers == "manual")
    plain = _check(method(False), manual=layers == "manual")
    barriers, matmuls = _recomputed(graph)
    assert barriers == 4  # one per layer
    assert matmuls == _recomputed(plain)[1] + 4  # each layer's forward matmul runs again


@pytest.mark.parametrize("micro_batches", [None, 2])
def test_remat_shard_parallel_matches_serial(micro_batches):
    method = ShardParallel(num_micro_batches=micro_batches,
                           layer_option=AutoLayerOption(layer_num=4, remat_layer=True))
    graph = _check(method)
    assert _recomputed(graph)[0] == 4


def _shard_plan(remat, budget):
    state, batch = make_mlp(256, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9))
    method = ShardParallel(devices=tuple(jax.devices()[:1]), memory_budget_per_device=budget,
                           layer_option=AutoLayerOption(layer_num=4, remat_layer=remat))
    p = alpa_lite.parallelize(mse_step, method=method)
    return p, p.plan(state, batch), (state, batch)


def test_shard_parallel_auto_remat_recomputes_the_fewest_layers_that_fit():
    _, plain, _ = _shard_plan(False, None)
    _, forced, _ = _shard_plan(True, None)
    peak, forced_peak = plain.peak_memory_bytes, forced.peak_memory_bytes
    assert forced_peak < 0.9 * peak

    _, above, _ = _shard_plan("auto", 1.01 * peak)  # fits as it is: nothing recomputed
    assert above.extra.remat_layers == (False,) * 4
    assert "rematerialized layers: 0 of 4 (none)" in above.summary()

    budget = (peak + forced_peak) / 2  # some layers must be recomputed, not all
    with pytest.raises(alpa_lite.InfeasiblePlanError):
        _shard_plan(False, budget)
    p, middle, args = _shard_plan("auto", budget)
    flags = list(middle.extra.remat_layers)
    assert middle.peak_memory_bytes <= budget
    assert flags == sorted(flags, reverse=True) and 0 < sum(flags) < 4  # the first r layers
    assert f"rematerialized layers: {sum(flags)} of 4" in middle.summary()
    graph = p.get_executable(*args).graph  # the recompute is really traced
    assert _recomputed(graph)[0] == sum(flags)
    actual_state, actual_losses = run_steps(p, *args)
    expected_state, expected_losses = run_steps(jax.jit(mse_step), *args)
    assert_trees_close(actual_losses, expected_losses, rtol=1e-4, atol=1e-5)
    assert_trees_close(actual_state.params, expected_state.params, rtol=1e-4, atol=1e-5)

    with pytest.raises(alpa_lite.InfeasiblePlanError, match="Even with all 4 layers"):
        _shard_plan("auto", 0.5 * forced_peak)


def test_bad_remat_layer_is_explained():
    with pytest.raises(InvalidConfigError, match="remat_layer must be True, False or 'auto'"):
        AutoLayerOption(layer_num=2, remat_layer="yes")


def _stage_activations(remat: bool, work):
    """Per stage of a 2-stage pipeline on one device each: (predicted activation bytes per
    micro-batch, XLA's output bytes of the stage's forward program: what it keeps for the
    backward pass), and the predicted forward+backward compute seconds."""
    method = PipeshardParallel(
        num_micro_batches=2, devices=tuple(jax.devices()[:2]),
        layer_option=AutoLayerOption(layer_num=4, method="names", remat_layer=remat),
        stage_option=ManualStageOption(forward_stage_layer_ids=((0, 1), (2, 3)),
                                       submesh_shapes=((1, 1), (1, 1))))
    executable = alpa_lite.parallelize(work.train_step, method=method).get_executable(
        work.state, work.batch)
    mesh = executable.plans[0].mesh
    option = ((1, 1), (1,))
    prices = pricing.price_layers(executable.graph, 4, [option], lambda *_: mesh,
                                  pricing.PricingOptions())[option]
    predicted = [sum(p.activation_bytes for p in prices[:2]),
                 sum(p.activation_bytes for p in prices[2:])]
    xla = [executable.lower_program(f"forward[{s}]").compile().memory_analysis()
           .output_size_in_bytes for s in range(2)]
    return predicted, xla, sum(p.compute_s for p in prices)


def test_remat_saves_the_predicted_activation_memory_in_xla():
    work = build(4, 128, 32)
    predicted_off, xla_off, compute_off = _stage_activations(False, work)
    predicted_on, xla_on, compute_on = _stage_activations(True, work)
    for s in range(2):
        predicted_saving = predicted_off[s] - predicted_on[s]
        xla_saving = xla_off[s] - xla_on[s]
        assert xla_on[s] < xla_off[s]
        assert abs(predicted_saving - xla_saving) <= 0.25 * xla_saving, (
            s, predicted_saving, xla_saving)
    # the recomputed forward is priced: more compute, less than a second forward+backward
    assert compute_off < compute_on < 2 * compute_off
