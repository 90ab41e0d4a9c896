"""Models that scan over their layers: the scan body is planned once and sharded inside the loop.

Covers a hand-written `jax.lax.scan` over stacked parameters and flax `nn.scan` (the GPT's
``scan_layers=True``): equal to serial `jax.jit` (SGD + momentum, fp32 rtol 1e-5), the body's
matmuls sharded, the planned collectives inside the compiled while body, the predicted step time
as good as the Python-loop model's, and plan time flat in depth.
"""

import dataclasses
import re
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import alpa_lite
from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import build_op_graph
from alpa_lite.loop_regions import remap_loops
from alpa_lite.layers import split_scans
from alpa_lite.models.presets import get_preset
from alpa_lite.models.train import build_workload
from alpa_lite.testing import assert_trees_close

from tiny_models import mse_step, run_steps


def _stacked_mlp(num_layers: int, hidden: int = 64, batch: int = 16):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(num_layers, hidden, hidden)) / 8, jnp.float32),
              "b": jnp.zeros((num_layers, hidden), jnp.float32)}
    data = {"x": jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32)}

    def apply(p, x):
        def body(h, wb):
            w, b = wb
            return jnp.tanh(h @ w + b), None
        return jax.lax.scan(body, x, (p["w"], p["b"]))[0]

    tx = optax.sgd(1e-2, momentum=0.9)
    return train_state.TrainState.create(apply_fn=apply, params=params, tx=tx), data


def _gpt(num_layers: int, scan_layers: bool, name: str = "gpt-tiny"):
    preset = get_preset(name).with_overrides(num_layers=num_layers, batch_size=8)
    config = dataclasses.replace(preset.config, scan_layers=scan_layers)
    return build_workload(dataclasses.replace(preset, config=config), optimizer=optax.sgd(1e-2))


def _while_body_collectives(hlo: str) -> list[str]:
    """Collectives whose op_name says they were traced inside a while (scan) body."""
    return [line for line in hlo.splitlines()
            if re.search(r" (all-reduce|all-gather|reduce-scatter|all-to-all)\(", line)
            and "while/body" in line]


def test_scan_expands_into_one_body_whatever_the_length():
    sizes = []
    for num_layers in (2, 8):
        state, data = _stacked_mlp(num_layers)
        jaxpr = jax.make_jaxpr(lambda p, x: state.apply_fn(p, x))(state.params, data["x"])
        graph = build_op_graph(jaxpr)
        assert len(graph.loops) == 1 and graph.loops[0].length == num_layers
        body = [n for n in graph.nodes if n.repeat == num_layers]
        assert any(n.name == "dot_general" for n in body)
        sizes.append(len(graph.nodes))
    assert sizes[0] == sizes[1]


def test_lax_scan_over_stacked_params_matches_serial_and_shards_the_body():
    state, data = _stacked_mlp(4)
    expected, expected_losses = run_steps(jax.jit(mse_step), state, data)
    p = alpa_lite.parallelize(mse_step, method=alpa_lite.ShardParallel(mesh_shape=(2, 4)))
    actual, losses = run_steps(p, state, data)
    assert_trees_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    assert_trees_close(actual.params, expected.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(actual.opt_state, expected.opt_state, rtol=1e-5, atol=1e-6)
    plan = p.plan(state, data).sharding
    dots = [d for d in plan.nodes if d.primitive == "dot_general"]
    assert dots and all(d.strategy != "R" for d in dots)  # no replicated matmul in the loop
    # The stacked kernel (L, h, h) is split on its h dims, never on the layer dim.
    kernel = plan.input_specs[list(plan.input_names).index(
        next(n for n in plan.input_names if "params" in n and "w" in n))]
    assert kernel[0] == () and any(kernel[1:])
    hlo = p.lower(state, data).compile().as_text()
    assert _while_body_collectives(hlo), "the planned collectives should sit in the while body"


def test_flax_nn_scan_gpt_matches_serial_and_plans_like_the_python_loop():
    scanned, looped = _gpt(2, True), _gpt(2, False)
    method = alpa_lite.ShardParallel(mesh_shape=(2, 4))
    p = alpa_lite.parallelize(scanned.train_step, method=method)
    actual = p(scanned.state, scanned.batch)
    expected = jax.jit(scanned.train_step)(scanned.state, scanned.batch)
    assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6)
    scan_s = p.plan(scanned.state, scanned.batch).predicted_step_time_s
    q = alpa_lite.parallelize(looped.train_step, method=method)
    loop_s = q.plan(looped.state, looped.batch).predicted_step_time_s
    assert abs(scan_s - loop_s) <= 0.05 * loop_s, (scan_s, loop_s)
    assert _while_body_collectives(p.lower(scanned.state, scanned.batch).compile().as_text())


def test_scanned_llama_matches_serial():
    work = _gpt(2, True, name="llama-tiny")
    p = alpa_lite.parallelize(work.train_step, method=alpa_lite.ShardParallel(mesh_shape=(2, 4)))
    expected = jax.jit(work.train_step)(work.state, work.batch)
    assert_trees_close(p(work.state, work.batch), expected, rtol=1e-5, atol=1e-6)


def test_plan_time_of_scanned_layers_is_flat_in_depth():
    method = alpa_lite.ShardParallel(mesh_shape=(2, 4))
    state, data = _stacked_mlp(4)
    alpa_lite.parallelize(mse_step, method=method).plan(state, data)  # warm up tracing caches
    times = {}
    for num_layers in (4, 64):
        state, data = _stacked_mlp(num_layers)
        start = time.perf_counter()
        plan = alpa_lite.parallelize(mse_step, method=method).plan(state, data)
        times[num_layers] = time.perf_counter() - start
        assert plan.sharding.solver["num_groups"] < 100
    assert times[64] <= 2 * times[4] + 0.5, times  # +0.5 s: noise of a shared 2-core machine


def test_scan_with_micro_batches_and_in_a_pipeline_matches_serial():
    state, data = _stacked_mlp(4)
    expected, expected_losses = run_steps(jax.jit(mse_step), state, data)
    methods = [alpa_lite.ShardParallel(mesh_shape=(2, 4), num_micro_batches=2),
               alpa_lite.PipeshardParallel(num_micro_batches=2, stage_option="uniform",
                                           layer_option=alpa_lite.AutoLayerOption(layer_num=2))]
    for method in methods:
        actual, losses = run_steps(alpa_lite.parallelize(mse_step, method=method), state, data)
        assert_trees_close(losses, expected_losses, rtol=1e-4, atol=1e-5)
        assert_trees_close(actual.params, expected.params, rtol=1e-4, atol=1e-5)
        assert_trees_close(actual.opt_state, expected.opt_state, rtol=1e-4, atol=1e-5)


def test_a_scan_cut_between_programs_is_a_clear_error():
    state, data = _stacked_mlp(2)
    jaxpr = jax.make_jaxpr(lambda p, x: state.apply_fn(p, x))(state.params, data["x"])
    graph = build_op_graph(jaxpr)
    loop = graph.loops[0]
    half = {i: i for i in range(loop.first, (loop.first + loop.last) // 2)}
    with pytest.raises(InvalidConfigError, match="cut between two programs"):
        remap_loops(graph.loops, half)


def _while_then_cond_model():
    """A fixed-trip-count `while` (planned once, like a scan), then a `cond`.

    The loop mixes the batch with a matrix fed as data (while loops have no reverse-mode
    derivative, so no parameter may flow into one).
    """
    rng = np.random.default_rng(1)
    hidden = batch = 64  # every batch leaf (the matrix too) has the batch size as leading dim
    params = {"w": jnp.asarray(rng.normal(size=(hidden, hidden)) / 8, jnp.float32)}
    data = {"x": jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32),
            "mix": jnp.asarray(rng.normal(size=(hidden, hidden)) / 8, jnp.float32),
            "y": jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32)}

    def apply(p, x, mix):
        _, x = jax.lax.while_loop(lambda c: c[0] < 3,
                                  lambda c: (c[0] + 1, jnp.tanh(c[1] @ mix)), (0, x))
        h = x @ p["w"]
        return jax.lax.cond(jnp.sum(p["w"]) > 0, jnp.tanh, lambda a: a * 0.5, h)

    tx = optax.sgd(1e-2, momentum=0.9)
    return train_state.TrainState.create(apply_fn=apply, params=params, tx=tx), data


def _while_step(state, batch):
    def loss_fn(params):
        out = state.apply_fn(params, batch["x"], batch["mix"])
        return jnp.mean((out - batch["y"]) ** 2)

    loss, grads = alpa_lite.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def test_fixed_trip_count_while_is_planned_once_and_matches_serial():
    state, data = _while_then_cond_model()
    jaxpr = jax.make_jaxpr(state.apply_fn)(state.params, data["x"], data["mix"])
    graph = build_op_graph(jaxpr)
    kinds = [(loop.length, loop.cond_jaxpr is not None, len(loop.branches))
             for loop in graph.loops]
    assert kinds == [(3, True, 0), (1, False, 2)]  # the while, then the cond
    expected, expected_losses = run_steps(jax.jit(_while_step), state, data)
    methods = [alpa_lite.ShardParallel(mesh_shape=(2, 4)),
               alpa_lite.PipeshardParallel(num_micro_batches=1, stage_option="uniform",
                                           layer_option=alpa_lite.AutoLayerOption(layer_num=2))]
    for method in methods:
        p = alpa_lite.parallelize(_while_step, method=method)
        actual, losses = run_steps(p, state, data)
        assert_trees_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
        assert_trees_close(actual.params, expected.params, rtol=1e-5, atol=1e-6)
    plan = alpa_lite.parallelize(_while_step, method=methods[0]).plan(state, data).sharding
    body_dot = next(d for d in plan.nodes if d.primitive == "dot_general"
                    and graph.nodes[d.index].repeat == 3)
    assert body_dot.strategy != "R"


def test_while_without_a_fixed_trip_count_stays_one_node():
    def f(x):
        return jax.lax.while_loop(lambda c: jnp.sum(c) < 10.0, lambda c: c * 2.0, x)

    graph = build_op_graph(jax.make_jaxpr(f)(jnp.ones(4)))
    assert graph.loops == () and [n.name for n in graph.nodes] == ["while"]


def test_cond_branches_planned_jointly_match_serial():
    rng = np.random.default_rng(2)
    hidden, batch = 64, 16
    params = {"w": jnp.asarray(rng.normal(size=(hidden, hidden)) / 8, jnp.float32),
              "v": jnp.asarray(rng.normal(size=(hidden, hidden)) / 8, jnp.float32)}
    data = {"x": jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32)}

    def apply(p, x):
        h = x @ p["w"]
        return jax.lax.cond(jnp.sum(p["w"]) > 0, lambda a, v: jnp.tanh(a @ v),
                            lambda a, v: a * 0.5, h, p["v"])

    graph = build_op_graph(jax.make_jaxpr(apply)(params, data["x"]))
    (region,) = graph.loops
    assert len(region.branches) == 2 and all(region.branches)
    tx = optax.sgd(1e-2, momentum=0.9)
    state = train_state.TrainState.create(apply_fn=apply, params=params, tx=tx)
    expected, expected_losses = run_steps(jax.jit(mse_step), state, data)
    methods = [alpa_lite.ShardParallel(mesh_shape=(2, 4), strict=True),
               alpa_lite.ShardParallel(mesh_shape=(4, 2), num_micro_batches=2),
               alpa_lite.PipeshardParallel(num_micro_batches=2, stage_option="uniform",
                                           layer_option=alpa_lite.AutoLayerOption(layer_num=2))]
    for method in methods:
        p = alpa_lite.parallelize(mse_step, method=method)
        actual, losses = run_steps(p, state, data)
        assert_trees_close(losses, expected_losses, rtol=1e-4, atol=1e-5)
        assert_trees_close(actual.params, expected.params, rtol=1e-4, atol=1e-5)
        assert_trees_close(actual.opt_state, expected.opt_state, rtol=1e-4, atol=1e-5)
    plan = alpa_lite.parallelize(mse_step, method=methods[0]).plan(state, data).sharding
    # One spec per cond result for all branches: each join node has one in_spec per branch.
    joins = [d for d in plan.nodes if d.primitive == "loop_exit"]
    assert joins and all(len(set(d.in_specs[1:])) == 1 for d in joins)
    dots = [d for d in plan.nodes if d.primitive == "dot_general"]
    assert len(dots) >= 4 and all(d.strategy != "R" for d in dots)  # branch matmuls included


def test_batch_dependent_cond_with_micro_batches_is_a_clear_error():
    state, data = _stacked_mlp(2)
    layers = state.apply_fn

    def apply(p, x):
        h = layers(p, x)
        return jax.lax.cond(jnp.sum(h) > 0, jnp.tanh, lambda a: a * 0.5, h)

    state = state.replace(apply_fn=apply)
    method = alpa_lite.ShardParallel(mesh_shape=(2, 4), num_micro_batches=2)
    with pytest.raises(InvalidConfigError, match="sum or a mean over the batch"):
        alpa_lite.parallelize(mse_step, method=method).plan(state, data)


def test_split_scans_keeps_the_function():
    state, data = _stacked_mlp(5)
    fun = lambda p, x: state.apply_fn(p, x)  # noqa: E731
    closed = jax.make_jaxpr(fun)(state.params, data["x"])
    split = split_scans(closed, 2)
    scans = [e for e in split.jaxpr.eqns if e.primitive.name == "scan"]
    assert sorted(e.params["length"] for e in scans) == [2, 3]
    leaves = jax.tree_util.tree_leaves((state.params, data["x"]))
    got = jax.extend.core.jaxpr_as_fun(split)(*leaves)
    want = jax.extend.core.jaxpr_as_fun(closed)(*leaves)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-6)


def test_pipeline_splits_scanned_gpt_layers_across_stages():
    work = _gpt(4, True)
    method = alpa_lite.PipeshardParallel(num_micro_batches=2, stage_option="uniform",
                                         layer_option=alpa_lite.AutoLayerOption(layer_num=2))
    p = alpa_lite.parallelize(work.train_step, method=method)
    actual = p(work.state, work.batch)
    expected = jax.jit(work.train_step)(work.state, work.batch)
    assert_trees_close(actual, expected, rtol=1e-4, atol=1e-5)
    stages = p.plan(work.state, work.batch).stages
    assert len(stages) == 2
    forward = [s.forward_s for s in stages]
    assert min(forward) > 0.5 * max(forward), forward  # each stage runs part of the scan


def test_scan_cuts_count_the_layers_around_the_scan():
    """A scanned 4-block GPT whose vocabulary head costs about two blocks, in 2 layers: the
    scan is cut after 3 iterations (embedding + 3 blocks | 1 block + head), not in the middle
    (which left the head's stage 1.3x the flops of the other); equal to serial."""
    preset = get_preset("gpt-tiny").with_overrides(num_layers=4, batch_size=8)
    config = dataclasses.replace(preset.config, scan_layers=True, vocab_size=1664)
    work = build_workload(dataclasses.replace(preset, config=config), optimizer=optax.sgd(1e-2))
    method = alpa_lite.PipeshardParallel(num_micro_batches=2, stage_option="uniform",
                                         layer_option=alpa_lite.AutoLayerOption(layer_num=2))
    p = alpa_lite.parallelize(work.train_step, method=method)
    assert_trees_close(p(work.state, work.batch), jax.jit(work.train_step)(work.state, work.batch),
                       rtol=1e-4, atol=1e-5)
    plan = p.plan(work.state, work.batch)
    assert plan.extra.layers.imbalance < 1.1
    graph = p.get_executable(work.state, work.batch).graph
    # the forward pieces and their mirrored backward scans
    assert sorted(loop.length for loop in graph.loops if loop.parent == -1
                  and not loop.branches) == [1, 1, 3, 3]
