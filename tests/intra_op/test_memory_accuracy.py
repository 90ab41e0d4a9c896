"""The planner's predicted peak memory per device against XLA's memory_analysis().

XLA's footprint of the compiled SPMD program is argument + output + temp - alias bytes per
device. The prediction models arguments, outputs and live temporaries (see
alpa_lite/intra_op/memory_terms.py); 25 % covers what it leaves out (XLA's fusion and buffer
reuse decisions), on a model where parameters dominate (the bench's gpt-tiny) and on one with
wider layers.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_lite
from alpa_lite.graph import build_op_graph
from alpa_lite.intra_op.ilp import (MemoryPairTerm, MemoryTerm, ShardingProblem, memory_profile,
                                    solve_brute_force, solve_sharding_problem)
from alpa_lite.intra_op.planner import solve_intra_op
from alpa_lite.intra_op.problem import InputRole, SpecPolicy
from alpa_lite.mesh import LogicalMesh
from alpa_lite.models import build_workload
from alpa_lite.models.presets import get_preset
from alpa_lite.testing import xla_footprint_bytes

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from bench_memory_model import build  # noqa: E402  (the benchmark's model: one definition)

SIZES = {  # name: (layers, hidden, batch)
    "bench": (4, 64, 32),
    "wide": (2, 256, 16),
}
METHODS = {
    "data": lambda: alpa_lite.DataParallel(),
    "zero2": lambda: alpa_lite.Zero2Parallel(),
    "zero3": lambda: alpa_lite.Zero3Parallel(),
    "shard8": lambda: alpa_lite.ShardParallel(),
    "shard2x4": lambda: alpa_lite.ShardParallel(mesh_shape=(2, 4)),
    "shard4x2": lambda: alpa_lite.ShardParallel(mesh_shape=(4, 2)),
}


@pytest.fixture(scope="module", params=list(SIZES))
def workload(request):
    return build(*SIZES[request.param])


@pytest.fixture(scope="module")
def measure(workload):
    """method -> (plan, XLA's argument + output + temp - alias bytes per device), memoised."""
    cache = {}

    def run(method):
        if method not in cache:
            p = alpa_lite.parallelize(workload.train_step, method=METHODS[method]())
            plan = p.plan(workload.state, workload.batch)
            cache[method] = plan, xla_footprint_bytes(
                p.lower(workload.state, workload.batch).compile())
        return cache[method]

    return run


@pytest.mark.parametrize("method", list(METHODS))
def test_predicted_peak_memory_is_within_25_percent_of_xla(measure, method):
    plan, measured = measure(method)
    predicted = plan.peak_memory_bytes
    assert predicted == plan.sharding.peak_memory_bytes
    assert abs(predicted - measured) / measured <= 0.25, (
        f"{method}: predicted {predicted / 2**20:.3f} MiB, XLA {measured / 2**20:.3f} MiB")


def test_zero_methods_predict_less_memory_than_data_parallel(measure):
    # ZeRO-3 vs ZeRO-2 is not ordered on the bench model: its gathered parameters cost about
    # what its sharded parameters save (XLA agrees: 3.20 vs 3.19 MiB).
    data = measure("data")[0].peak_memory_bytes
    assert measure("zero2")[0].peak_memory_bytes < data
    assert measure("zero3")[0].peak_memory_bytes < data


def test_pipeline_plan_peak_memory_is_the_largest_stage_peak():
    work = build_workload(get_preset("gpt-tiny"), abstract=True)
    p = alpa_lite.parallelize(work.train_step, method=alpa_lite.PipeshardParallel(
        num_micro_batches=2, layer_option=alpa_lite.AutoLayerOption(layer_num=2),
        stage_option="uniform"))
    plan = p.plan(work.state, work.batch)
    peaks = [s.peak_memory_bytes for s in plan.stages]
    assert len(peaks) == 2 and min(peaks) > 0
    assert plan.peak_memory_bytes == max(peaks)
    again = alpa_lite.ParallelPlan.from_json(plan.to_json())
    assert again.peak_memory_bytes == plan.peak_memory_bytes


def test_plan_without_sharding_or_stages_has_no_peak_memory():
    plan = alpa_lite.ParallelPlan("PipeshardParallel", 1, None, 0.0)
    assert np.isnan(plan.peak_memory_bytes)


def test_pair_terms_count_only_for_the_matching_choices():
    problem = ShardingProblem(
        node_costs=(np.array([0.0, 1.0]), np.array([0.0, 2.0])),
        memory_terms=(MemoryTerm(0, np.array([4.0, 2.0]), 0, 1),),
        memory_pair_terms=(MemoryPairTerm(0, 1, np.array([[0.0, 8.0], [8.0, 0.0]]), 1, 1),),
        num_points=2)
    assert list(memory_profile(problem, (0, 0))) == [4.0, 4.0]
    assert list(memory_profile(problem, (0, 1))) == [4.0, 12.0]
    assert list(memory_profile(problem, (1, 1))) == [2.0, 2.0]


def test_ilp_with_pair_terms_respects_the_budget_like_brute_force():
    problem = ShardingProblem(
        node_costs=(np.array([0.0, 1.0]), np.array([0.0, 2.0]), np.array([0.0, 0.5])),
        edges=((0, 2, np.array([[0.0, 3.0], [3.0, 0.0]])),),
        memory_terms=(MemoryTerm(0, np.array([4.0, 2.0]), 0, 1),
                      MemoryTerm(2, np.array([3.0, 1.0]), 1, 1)),
        memory_pair_terms=(MemoryPairTerm(0, 1, np.array([[0.0, 8.0], [8.0, 0.0]]), 1, 1),),
        num_points=2, memory_budget_bytes=6.0)
    expected = solve_brute_force(problem)
    got = solve_sharding_problem(problem)
    assert got.peak_memory_bytes <= 6.0
    assert got.objective == pytest.approx(expected.objective)


def _sgd_step_plan(donated_inputs):
    def step(w, x):
        grad = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)
        return w - 0.1 * grad

    w, x = jnp.ones((256, 256)), jnp.ones((64, 256))
    graph = build_op_graph(jax.make_jaxpr(step)(w, x))
    return solve_intra_op(graph, LogicalMesh(shape=(8,)), input_roles=[InputRole.PARAM,
                          InputRole.BATCH], input_paths=["w", "x"], policy=SpecPolicy.DATA,
                          alias_pairs=[(0, 0)], donated_inputs=donated_inputs)


def test_donated_state_is_counted_once():
    kept, donated = _sgd_step_plan(frozenset()), _sgd_step_plan(frozenset({0}))
    param_bytes = 256 * 256 * 4  # replicated under data parallelism
    assert kept.peak_memory_bytes - donated.peak_memory_bytes == pytest.approx(param_bytes)
