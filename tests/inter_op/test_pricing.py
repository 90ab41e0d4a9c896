"""One pricing path: parallelize and simulation plan pipelines through `inter_op.pricing`, and
the stage DP keeps pipelines within a memory budget."""

import types

import optax
import pytest

import alpa_lite
from alpa_lite.cluster import get_cluster_preset
from alpa_lite.config import AutoLayerOption, PipeshardParallel, UniformStageOption
from alpa_lite.inter_op import pricing
from alpa_lite.pipeline_model.schedules import in_flight_micro_batches
from alpa_lite.models import build_workload, get_preset
from alpa_lite.simulate import simulate


def test_parallelize_and_simulation_give_the_same_plan_and_time():
    preset = get_preset("gpt-tiny").with_overrides(num_layers=3, batch_size=16)
    cluster = get_cluster_preset("v100-32gb-4x").with_hosts(2)
    k = 4
    simulated = simulate(preset, cluster, method="auto", num_micro_batches=k)
    work = build_workload(preset, abstract=True)
    method = PipeshardParallel(num_micro_batches=k, stage_option="auto",
                               layer_option=AutoLayerOption(layer_num=3, method="names"))
    plan = alpa_lite.parallelize(work.train_step, method=method).plan(
        work.state, work.batch, cluster=cluster)
    assert [s.layers for s in plan.stages] == [s.layers for s in simulated.stages]
    assert [s.submesh for s in plan.stages] == [s.submesh for s in simulated.stages]
    assert [s.logical_mesh for s in plan.stages] == [s.logical_mesh for s in simulated.stages]
    assert plan.predicted_step_time_s == pytest.approx(simulated.predicted_step_time_s,
                                                       rel=1e-9)


def test_one_f_one_b_and_gpipe_keep_different_activations_in_flight():
    assert [in_flight_micro_batches("1f1b", 3, s, 8) for s in range(3)] == [3, 2, 1]
    assert [in_flight_micro_batches("gpipe", 3, s, 8) for s in range(3)] == [8, 8, 8]
    assert in_flight_micro_batches("1f1b", 4, 0, 2) == 2


def test_gradient_sync_is_priced_once_per_step():
    stage = [1.0, 2.0]
    assert pricing.pipeline_step_time_s(stage, [0.5, 0.25], 4) == 1 + 2 + 3 * 2 + 0.5


def test_stages_sharing_a_hosts_compute_take_turns():
    # side by side: fill/drain + 3 x the slowest + the largest once-per-step work
    assert pricing.pipeline_step_time_s([1.0, 2.0], [0.5, 0.25], 4) == 9.5
    # on one host whose devices share compute: the host's whole work, 4 + 0.5 + 8 + 0.25
    one_host = pricing.shared_stage_hosts([(1, 2), (1, 2)], devices_per_host=4)
    assert one_host == [[0], [0]]
    assert pricing.pipeline_step_time_s([1.0, 2.0], [0.5, 0.25], 4,
                                        stage_hosts=one_host) == 12.75
    # one stage per host: they overlap again
    two_hosts = pricing.shared_stage_hosts([(1, 2), (1, 2)], devices_per_host=2)
    assert two_hosts == [[0], [1]]
    assert pricing.pipeline_step_time_s([1.0, 2.0], [0.5, 0.25], 4,
                                        stage_hosts=two_hosts) == 9.5
    assert pricing.shared_stage_hosts([(1, 2)], devices_per_host=None) is None


def _single_mesh_plan(k: int):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "end_to_end"))
    from tiny_models import make_mlp, mse_step

    # the same micro-batch (16 examples) whatever k: only the number of micro-batches changes
    state, batch = make_mlp(16 * k, 64, 4, optimizer=optax.adam(1e-3))
    method = alpa_lite.DataParallel(num_micro_batches=k)
    return alpa_lite.parallelize(mse_step, method=method).plan(state, batch)


def test_the_optimizer_update_is_priced_once_per_step_not_per_micro_batch():
    two, four = _single_mesh_plan(2), _single_mesh_plan(4)
    assert two.extra.apply_s > 0 and two.extra.apply_s == pytest.approx(
        four.extra.apply_s)
    once = two.extra.apply_s + two.extra.grad_sync_s
    per_micro_batch = (two.predicted_step_time_s - once - two.sharding.mesh.launch_latency_s) / 2
    # two more micro-batches add two micro-batches of work, and no second update or sync
    assert four.predicted_step_time_s == pytest.approx(
        two.predicted_step_time_s + 2 * per_micro_batch, rel=1e-9)
    assert per_micro_batch > 0


def test_pipeline_stages_record_their_update(mlp):
    state, batch, step = mlp
    method = PipeshardParallel(num_micro_batches=4, layer_option=AutoLayerOption(layer_num=4),
                               stage_option=alpa_lite.UniformStageOption(num_stages=2))
    plan = alpa_lite.parallelize(step, method=method).plan(state, batch)
    stages = plan.stages
    assert len(stages) == 2 and all(s.apply_s > 0 for s in stages)
    again = alpa_lite.ParallelPlan.from_json(plan.to_json())
    assert [s.apply_s for s in again.stages] == [s.apply_s for s in stages]


@pytest.fixture
def mlp():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "end_to_end"))
    from tiny_models import make_mlp, mse_step

    state, batch = make_mlp(64, 256, 4, optimizer=optax.sgd(0.1, momentum=0.9))
    return state, batch, mse_step


def _plan(mlp, budget, schedule="1f1b", k=4):
    state, batch, step = mlp
    method = PipeshardParallel(num_micro_batches=k, layer_option=AutoLayerOption(layer_num=4),
                               stage_option="auto", schedule=schedule,
                               memory_budget_per_device=budget)
    return alpa_lite.parallelize(step, method=method).plan(state, batch)


def test_a_budget_no_pipeline_meets_names_the_smallest_need(mlp):
    with pytest.raises(alpa_lite.InfeasiblePlanError, match="memory budget") as err:
        _plan(mlp, budget=1024.0)
    assert err.value.budget_bytes == 1024.0
    assert err.value.min_bytes > 1024.0


def _stage_memory(plan) -> list[float]:
    if plan.stages:
        return [s.peak_memory_bytes for s in plan.stages]
    return plan.extra.stage_memory_bytes  # one stage, run as ShardParallel


def test_the_stage_dp_keeps_every_stage_within_the_budget(mlp):
    free = _plan(mlp, budget=None)
    peak = max(_stage_memory(free))
    tight = _plan(mlp, budget=peak * 0.6)
    assert max(_stage_memory(tight)) <= peak * 0.6
    # another layout (another logical view of the same devices, or more stages) or
    # memory-lean layer plans, chosen because the faster one does not fit
    assert (getattr(tight.extra, "logical_mesh", None), len(tight.stages)) != (
        getattr(free.extra, "logical_mesh", None), len(free.stages)) or getattr(tight.extra, "lean", 0.0) or any(
        s.lean for s in tight.stages)
    assert tight.predicted_step_time_s >= free.predicted_step_time_s


def test_gpipe_keeps_more_in_flight_than_1f1b(mlp):
    state, batch, step = mlp

    def stages(schedule):
        method = PipeshardParallel(num_micro_batches=4, layer_option=AutoLayerOption(layer_num=4),
                                   stage_option=UniformStageOption(num_stages=2),
                                   schedule=schedule)
        return alpa_lite.parallelize(step, method=method).plan(state, batch).stages

    one, gpipe = stages("1f1b"), stages("gpipe")
    assert len(one) == len(gpipe) == 2
    # every stage holds 4 micro-batches' activations under GPipe; 2 and 1 under 1F1B
    assert all(g.peak_memory_bytes > o.peak_memory_bytes for g, o in zip(gpipe, one))


def test_a_128_layer_model_gets_one_layer_stages_when_they_are_fastest():
    """The stage DP sees all 128 blocks of a 128-block model on 128 devices
    (`simulate.dp_layer_count`; before, at most 32 groups of 4 blocks) and, when a layer on
    one device beats two layers on two devices, gives each layer its own stage."""
    from alpa_lite.simulate import dp_layer_count

    assert dp_layer_count(128, 128) == 128
    one = pricing.LayerPrice(1.0, 0.0, 0.0, 10.0, 1.0, 1.0)
    two = pricing.LayerPrice(0.7, 0.0, 0.0, 5.0, 0.5, 1.0)  # per layer on 2 devices
    options = {((1, 1), (1,)): [one] * 128, ((1, 2), (2,)): [two] * 128}
    meshes = {option: types.SimpleNamespace(launch_latency_s=0.0) for option in options}
    solution = pricing.solve_stages(options, meshes, num_devices=128, k=256, schedule="1f1b",
                                    memory_budget_bytes=None, link=(0.0, 0.0))
    assert solution.assignment.layer_to_stage == tuple(range(128))
    assert set(solution.assignment.submesh_shapes) == {(1, 1)}
