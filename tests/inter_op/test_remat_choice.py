"""remat_layer="auto": the stage DP rematerializes exactly when the memory budget needs it."""

import sys
from pathlib import Path

import jax
import pytest

import alpa_lite
from alpa_lite.config import (AutoLayerOption, AutoStageOption, PipeshardParallel,
                              UniformStageOption)
from alpa_lite.errors import InvalidConfigError
from alpa_lite.inter_op.pricing import LEAN_LEVELS

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from bench_memory_model import build  # noqa: E402  (the benchmark's GPT: one definition)


@pytest.fixture(scope="module")
def work():
    return build(4, 128, 32)


def _plan(work, remat, budget, devices=1):
    method = PipeshardParallel(
        num_micro_batches=2, devices=tuple(jax.devices()[:devices]), stage_option="auto",
        layer_option=AutoLayerOption(layer_num=4, method="names", remat_layer=remat),
        memory_budget_per_device=budget)
    p = alpa_lite.parallelize(work.train_step, method=method)
    return p, p.plan(work.state, work.batch)


def _peak(plan) -> float:
    if plan.stages:
        return max(s.peak_memory_bytes for s in plan.stages)
    return max(plan.extra.stage_memory_bytes)  # one stage, run as ShardParallel


def test_auto_remat_is_chosen_exactly_when_the_budget_needs_it(work):
    # one device: the only plan is one stage, so the no-remat peak is the smallest need
    _, plain = _plan(work, False, None)
    _, forced = _plan(work, True, None)
    no_remat_peak = _peak(plain)
    assert _peak(forced) < 0.99 * no_remat_peak
    assert forced.predicted_step_time_s > plain.predicted_step_time_s  # recompute is priced

    _, above = _plan(work, "auto", 1.01 * no_remat_peak)
    assert above.extra.remat is False
    assert above.predicted_step_time_s == pytest.approx(plain.predicted_step_time_s)
    assert "rematerialized layers: no" in above.summary()

    p, below = _plan(work, "auto", 0.99 * no_remat_peak)
    assert below.extra.remat is True
    assert _peak(below) <= 0.99 * no_remat_peak
    assert below.predicted_step_time_s == pytest.approx(forced.predicted_step_time_s)
    assert "rematerialized layers: yes" in below.summary()
    graph = p.get_executable(work.state, work.batch).graph  # the recompute is really traced
    assert sum(n.name == "optimization_barrier" for n in graph.nodes) == 4

    with pytest.raises(alpa_lite.InfeasiblePlanError):
        _plan(work, False, 0.99 * no_remat_peak)


def _plan_two_stages(work, remat, budget):
    method = PipeshardParallel(
        num_micro_batches=2, devices=tuple(jax.devices()[:2]),
        stage_option=AutoStageOption(submesh_shapes=((1, 1),)),  # two 1-device stages
        layer_option=AutoLayerOption(layer_num=4, method="names", remat_layer=remat),
        memory_budget_per_device=budget)
    p = alpa_lite.parallelize(work.train_step, method=method)
    return p, p.plan(work.state, work.batch)


def test_auto_remat_is_chosen_per_stage_in_a_pipeline(work):
    _, free = _plan_two_stages(work, "auto", None)
    _, all_remat = _plan_two_stages(work, True, None)
    assert len(free.stages) == 2 and not any(s.remat for s in free.stages)
    budget = 0.85 * _peak(free)  # the first stage (2 micro-batches in flight) is the peak
    with pytest.raises(alpa_lite.InfeasiblePlanError):
        _plan_two_stages(work, False, budget)
    p, tight = _plan_two_stages(work, "auto", budget)
    assert [s.remat for s in tight.stages] == [True, False] and _peak(tight) <= budget
    assert free.predicted_step_time_s < tight.predicted_step_time_s
    assert tight.predicted_step_time_s <= all_remat.predicted_step_time_s * (1 + 1e-9)
    flags = list(tight.extra.layers.remat_layers)
    assert flags == [s.remat for s in tight.stages for _ in s.layers]
    graph = p.get_executable(work.state, work.batch).graph
    assert sum(n.name == "optimization_barrier" for n in graph.nodes) == sum(flags)
    lines = tight.summary().splitlines()
    header = next(i for i, line in enumerate(lines) if "peak mem" in line)
    assert lines[header].split()[-2:] == ["remat", "lean"]
    rows = [line.split()[-2:] for line in lines[header + 1:header + 3]]
    assert [remat for remat, _ in rows] == ["yes", "no"]
    # the lean column: "no", or the memory price level of the stage's memory-lean plans
    assert all(lean == "no" or float(lean) in LEAN_LEVELS for _, lean in rows)
    saved = alpa_lite.ParallelPlan.from_json(tight.to_json())  # a saved plan keeps the choice
    assert [s.remat for s in saved.stages] == [True, False]


def test_auto_remat_needs_auto_stages():
    with pytest.raises(InvalidConfigError, match="needs stage_option='auto'"):
        PipeshardParallel(num_micro_batches=2, stage_option=UniformStageOption(num_stages=2),
                          layer_option=AutoLayerOption(layer_num=2, remat_layer="auto"))


