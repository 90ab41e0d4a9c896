"""Memory-lean layer plans: the ILP with a price on the memory its inputs hold, offered to
the stage DP when the fastest layer plans do not fit, and run by the pipeline runtime."""

import jax
import numpy as np
import optax
import pytest

import alpa_lite
from alpa_lite.cluster import get_cluster_preset
from alpa_lite.config import AutoLayerOption, PipeshardParallel
from alpa_lite.graph import build_op_graph
from alpa_lite.intra_op.planner import solve_intra_op
from alpa_lite.intra_op.problem import InputRole
from alpa_lite.intra_op.resharding import tensor_bytes
from alpa_lite.intra_op.strategies import spec_shards
from alpa_lite.mesh import LogicalMesh
from alpa_lite.models import build_workload, get_preset
from alpa_lite.trace import trace_function


def _dense_layer_plan(price: float):
    def loss(w, x):
        return jax.numpy.sum(jax.numpy.tanh(jax.numpy.tanh(x @ w) @ w.T) ** 2)

    w = jax.ShapeDtypeStruct((64, 64), np.float32)
    x = jax.ShapeDtypeStruct((512, 64), np.float32)
    traced = trace_function(jax.grad(loss), (w, x), batch_argnums=(1,))
    graph = build_op_graph(traced.closed_jaxpr)
    mesh = LogicalMesh(shape=(4,), alpha_s=(1e-5,), beta_s_per_byte=(1e-9,))
    plan = solve_intra_op(graph, mesh, input_roles=[InputRole.PARAM, InputRole.BATCH],
                          input_paths=["w", "x"], input_memory_price=[price, 0.0])
    weight_bytes = tensor_bytes(graph.avals[graph.inputs[0]]) / spec_shards(
        plan.input_specs[0], mesh)
    return plan, weight_bytes


def test_a_memory_price_trades_time_for_sharded_inputs():
    fast, fast_bytes = _dense_layer_plan(0.0)
    lean, lean_bytes = _dense_layer_plan(1.0)  # a second per byte: memory above all
    assert fast_bytes == 64 * 64 * 4  # the batch is large: data parallel, w replicated
    assert lean_bytes == fast_bytes / 4
    # the objective reports seconds only, without the price
    assert fast.objective <= lean.objective < 1.0


@pytest.fixture(scope="module")
def work():
    preset = get_preset("gpt-tiny").with_overrides(num_layers=4, batch_size=64)
    return build_workload(preset, optimizer=optax.sgd(1e-2, momentum=0.9))


def _pipeline(work, budget):
    method = PipeshardParallel(
        num_micro_batches=8, stage_option="auto", devices=tuple(jax.devices()[:4]),
        layer_option=AutoLayerOption(layer_num=4, method="names"),
        memory_budget_per_device=budget, schedule="1f1b")  # the DP's own schedule
    return alpa_lite.parallelize(work.train_step, method=method, donate_argnums=(0,),
                                 cluster=get_cluster_preset("v100-32gb-4x"))


def test_lean_stages_fit_a_budget_the_fastest_plans_do_not_and_equal_serial(work):
    free = _pipeline(work, None).plan(work.state, work.batch)
    assert not any(s.lean for s in free.stages)
    peak = max(s.peak_memory_bytes for s in free.stages)
    budget = 0.65 * peak
    p = _pipeline(work, budget)
    plan = p.plan(work.state, work.batch)
    assert any(s.lean for s in plan.stages)  # a stage priced with its memory-lean plans
    assert max(s.peak_memory_bytes for s in plan.stages) <= budget
    assert "lean" in plan.summary()

    serial = jax.jit(work.train_step)
    state, expected = work.state, jax.tree_util.tree_map(np.array, work.state)
    for _ in range(2):
        state, metrics = p(state, work.batch)
        expected, expected_metrics = serial(expected, work.batch)
    for got, want in zip(jax.tree_util.tree_leaves((state, metrics)),
                         jax.tree_util.tree_leaves((expected, expected_metrics))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
