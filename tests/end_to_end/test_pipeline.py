"""PipeshardParallel equals serial jax.jit (reference cases 10 and 11).

Tolerance rtol 1e-4: gradients are accumulated over micro-batches in a different order.
"""

import jax
import optax
import pytest

import alpa_lite
from alpa_lite.config import (AutoLayerOption, ManualStageOption, PipeshardParallel,
                              UniformStageOption)
from alpa_lite.errors import InvalidConfigError
from alpa_lite.testing import assert_trees_close

from test_matches_serial import make_gpt
from tiny_models import make_mlp, mse_step, run_steps

HETEROGENEOUS = ManualStageOption(forward_stage_layer_ids=((0,), (1, 2, 3)),
                                  submesh_shapes=((1, 2), (1, 6)),
                                  logical_mesh_shapes=((2,), (2, 3)))
STAGES = {"uniform2": UniformStageOption(num_stages=2), "uniform4": UniformStageOption(num_stages=4),
          "2+6devices": HETEROGENEOUS}


def check_pipeline(step, state, batch, method, rtol=1e-4, atol=1e-5):
    p = alpa_lite.parallelize(step, method=method)
    actual_state, actual_losses = run_steps(p, state, batch)
    expected_state, expected_losses = run_steps(jax.jit(step), state, batch)
    assert p.num_plans == 1
    assert_trees_close(actual_losses, expected_losses, rtol=rtol, atol=atol)
    assert_trees_close(actual_state.params, expected_state.params, rtol=rtol, atol=atol)
    assert_trees_close(actual_state.opt_state, expected_state.opt_state, rtol=rtol, atol=atol)
    return p


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("stages", list(STAGES))
@pytest.mark.parametrize("layers", ["manual", "auto"])
def test_mlp_pipeline_matches_serial(layers, stages, schedule):
    state, batch = make_mlp(64, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9),
                            manual_boundaries=layers == "manual")
    layer_option = "manual" if layers == "manual" else AutoLayerOption(layer_num=4)
    method = PipeshardParallel(num_micro_batches=4, layer_option=layer_option,
                               stage_option=STAGES[stages], schedule=schedule)
    p = check_pipeline(mse_step, state, batch, method)
    plan = p.plan(state, batch)
    assert sum(len(s.layers) for s in plan.stages) == 4


@pytest.mark.parametrize("schedule,stages,virtual", [("zb-h1", "uniform2", None),
                                                     ("zb-h1", "uniform4", None),
                                                     ("zb-h1", "2+6devices", None),
                                                     ("interleaved-1f1b", "uniform2", 2),
                                                     ("interleaved-1f1b", "uniform2", 4)])
def test_zero_bubble_and_interleaved_pipelines_match_serial(schedule, stages, virtual):
    layers = 8 if virtual == 4 else 4
    state, batch = make_mlp(64, 16, layers, optimizer=optax.sgd(0.1, momentum=0.9))
    method = PipeshardParallel(num_micro_batches=4,
                               layer_option=AutoLayerOption(layer_num=layers),
                               stage_option=STAGES[stages], schedule=schedule,
                               virtual_stages=virtual)
    p = check_pipeline(mse_step, state, batch, method)
    plan = p.plan(state, batch)
    assert (plan.extra.schedule, plan.extra.virtual_stages) == (schedule, virtual or 1)
    executable = p.get_executable(state, batch)
    partition = executable.partition
    assert len(partition.forward) == len(plan.stages) * (virtual or 1)
    if schedule == "zb-h1":  # every chunk's weight gradients left its input-gradient program
        assert all(w.nodes for w in partition.weight)
        assert all(b.nodes for b in partition.backward[1:]) and not partition.backward[0].nodes
        names = [i.name for i in executable.instructions]
        assert names.count("weight[0]") == 4
    else:  # stage s holds chunks s, s + n, ...: layers interleaved
        n = len(plan.stages)
        assert [c % n for c in range(len(partition.forward))] == [
            prog.mesh for prog in partition.forward]
        assert plan.stages[0].layers == tuple(
            layer for layer in range(layers) if (layer * n * virtual // layers) % n == 0)


def test_zero_bubble_gpt_with_adamw_and_clipping_matches_serial():
    work = make_gpt()  # AdamW + clip_by_global_norm; attention, layer norms, tied embedding
    method = PipeshardParallel(num_micro_batches=2, layer_option=AutoLayerOption(layer_num=2),
                               stage_option=UniformStageOption(num_stages=2), schedule="zb-h1")
    p = check_pipeline(work.train_step, work.state, work.batch, method)
    assert all(w.nodes for w in p.get_executable(work.state, work.batch).partition.weight)


def test_auto_schedule_names_its_choice_and_the_runner_up():
    state, batch = make_mlp(64, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9))
    method = PipeshardParallel(num_micro_batches=4, layer_option=AutoLayerOption(layer_num=4),
                               stage_option=UniformStageOption(num_stages=2))
    assert method.schedule == "auto"
    p = check_pipeline(mse_step, state, batch, method)
    plan = p.plan(state, batch)
    assert plan.extra.schedule in ("1f1b", "zb-h1", "interleaved-1f1b")
    other, _, seconds, fits = plan.extra.runner_up
    assert other != plan.extra.schedule and fits and seconds >= plan.predicted_step_time_s


def test_interleaving_needs_enough_layers_and_micro_batches():
    state, batch = make_mlp(64, 16, 8)
    for k, virtual, match in [(4, 8, "needs at least 32 layers"), (2, 2, "multiple of the 4")]:
        method = PipeshardParallel(num_micro_batches=k, layer_option=AutoLayerOption(layer_num=8),
                                   stage_option=UniformStageOption(num_stages=4),
                                   schedule="interleaved-1f1b", virtual_stages=virtual)
        with pytest.raises(InvalidConfigError, match=match):
            alpa_lite.parallelize(mse_step, method=method).plan(state, batch)


def test_mlp_pipeline_auto_stages_matches_serial():
    state, batch = make_mlp(64, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9))
    method = PipeshardParallel(num_micro_batches=4, layer_option=AutoLayerOption(layer_num=4),
                               stage_option="auto")
    p = check_pipeline(mse_step, state, batch, method)
    plan = p.plan(state, batch)
    # every device is used: by the stages, or by a one-stage plan run as ShardParallel
    submeshes = [s.submesh for s in plan.stages] or [plan.extra.submesh]
    assert sum(rows * cols for rows, cols in submeshes) == 8
    summary = plan.summary()
    if plan.stages:
        assert "stage" in summary and "predicted" in summary
    else:  # one stage: the summary is ShardParallel's, on the stage's mesh
        assert f"logical mesh {plan.extra.logical_mesh}" in summary


@pytest.mark.parametrize("stage_option", [UniformStageOption(num_stages=2),
                                          ManualStageOption(forward_stage_layer_ids=((0,), (1,)),
                                                            submesh_shapes=((1, 2), (1, 6)),
                                                            logical_mesh_shapes=((2,), (3, 2)))])
def test_gpt_pipeline_with_global_norm_clipping_matches_serial(stage_option):
    work = make_gpt()  # AdamW + clip_by_global_norm: the norm is reduced across both stages
    method = PipeshardParallel(num_micro_batches=2, layer_option=AutoLayerOption(layer_num=2),
                               stage_option=stage_option)
    p = check_pipeline(work.train_step, work.state, work.batch, method)
    executable = p.get_executable(work.state, work.batch)
    meshes_in_first_phase = {prog.mesh for prog in executable.partition.apply
                             if prog.name.startswith("apply[0]")}
    assert meshes_in_first_phase == {0, 1}  # each stage reduces its own gradients' norm first
    # Every update runs where its gradient is: only scalars (norm partial sums, the step count)
    # cross meshes in the apply phase, never a tensor (a cross-mesh copy every step).
    partition = executable.partition
    made_on = {v: prog.mesh for prog in partition.forward + partition.backward + partition.apply
               for v in prog.outputs}
    made_on.update({dst: made_on[src] for src, dst in zip(partition.boundary.invars,
                                                          partition.boundary.outvars)
                    if src in made_on})
    crossing = [(prog.name, executable.graph.avals[v]) for prog in partition.apply
                for v in prog.inputs if made_on.get(v, prog.mesh) != prog.mesh]
    assert crossing and all(aval.ndim == 0 for _, aval in crossing), crossing


def test_a_pipeline_needs_a_gradient():
    def step(w, x):  # no gradient: nothing to pipeline backward
        return w, (x @ w).sum()

    method = PipeshardParallel(num_micro_batches=2, layer_option=AutoLayerOption(layer_num=2))
    import jax.numpy as jnp
    with pytest.raises(alpa_lite.InvalidConfigError, match="computes no gradient"):
        alpa_lite.parallelize(step, method=method).plan(jnp.ones((4, 4)), jnp.ones((8, 4)))


def test_uniform_stages_must_divide_layers():
    state, batch = make_mlp(64, 16, 4)
    method = PipeshardParallel(num_micro_batches=2, layer_option=AutoLayerOption(layer_num=4),
                               stage_option=UniformStageOption(num_stages=3))
    with pytest.raises(alpa_lite.InvalidConfigError, match="divide both the layers"):
        alpa_lite.parallelize(mse_step, method=method).plan(state, batch)


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": "zigzag"}, "schedule must be one of"),
    ({"layer_option": "magic"}, "layer_option must be"),
    ({"stage_option": "best"}, "stage_option must be"),
    ({"num_micro_batches": 0}, "num_micro_batches must be a positive integer"),
])
def test_invalid_pipeshard_options(kwargs, match):
    with pytest.raises(alpa_lite.InvalidConfigError, match=match):
        PipeshardParallel(**kwargs)


@pytest.mark.parametrize("stage_option", ["auto", "uniform"])
def test_a_saved_pipeline_plan_runs_without_solving(stage_option, monkeypatch):
    state, batch = make_mlp(64, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9))
    method = PipeshardParallel(num_micro_batches=4, layer_option=AutoLayerOption(layer_num=4),
                               stage_option=stage_option)
    plan = alpa_lite.parallelize(mse_step, method=method).plan(state, batch)
    loaded = alpa_lite.ParallelPlan.from_json(plan.to_json())

    import alpa_lite.inter_op.driver as pipeline_driver
    import alpa_lite.intra_op.driver as single_mesh_driver
    import alpa_lite.inter_op.pricing as pricing_module

    def no_solving(*args, **kwargs):
        raise AssertionError("a loaded plan must not be solved again")

    monkeypatch.setattr(single_mesh_driver, "solve_intra_op", no_solving)
    monkeypatch.setattr(pipeline_driver, "solve_intra_op", no_solving)
    monkeypatch.setattr(pricing_module, "solve_planning_problem", no_solving)
    p = alpa_lite.parallelize(mse_step, method=method).use_plan(loaded)
    actual_state, actual_losses = run_steps(p, state, batch)
    expected_state, expected_losses = run_steps(jax.jit(mse_step), state, batch)
    assert_trees_close(actual_losses, expected_losses, rtol=1e-4, atol=1e-5)
    assert_trees_close(actual_state.params, expected_state.params, rtol=1e-4, atol=1e-5)
    assert p.plan(state, batch).stages == loaded.stages


def test_a_step_closing_over_a_constant_array_matches_serial():
    import jax.numpy as jnp
    import numpy as np

    mix = jnp.asarray(np.random.default_rng(0).normal(size=(16, 16)), jnp.float32)

    def step(params, batch):  # `mix` is a closed-over constant of the traced step
        def loss(p):
            h = jnp.tanh(jnp.tanh(batch["x"] @ mix) @ p["w"])
            return jnp.mean((h @ p["v"] - batch["y"]) ** 2)

        value, grads = alpa_lite.value_and_grad(loss)(params)
        return jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, params, grads), value

    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(rng.normal(size=(16, 16)) * 0.3, jnp.float32) for k in "wv"}
    batch = {"x": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}
    method = PipeshardParallel(num_micro_batches=2, layer_option=AutoLayerOption(layer_num=2),
                               stage_option=UniformStageOption(num_stages=2))
    actual = alpa_lite.parallelize(step, method=method)(params, batch)
    assert_trees_close(actual, jax.jit(step)(params, batch), rtol=1e-5, atol=1e-6)


def test_backward_programs_share_one_copy_of_their_parameters():
    """A layer marker's copy of a parameter is the same in every micro-batch: every backward
    reads micro-batch 0's, and the forward's other copies are dropped at once, so a stage
    holds one copy of its parameters, not one per micro-batch in flight."""
    work = make_gpt()
    method = PipeshardParallel(num_micro_batches=4, layer_option=AutoLayerOption(layer_num=2),
                               stage_option=UniformStageOption(num_stages=2))
    executable = alpa_lite.parallelize(work.train_step, method=method).get_executable(
        work.state, work.batch)
    instructions = executable.instructions
    written_by_forward = {slot for ins in instructions if ins.name.startswith("forward")
                          for slot in ins.writes}
    backward_reads = [set(ins.reads) & written_by_forward for ins in instructions
                      if ins.name.startswith("backward[0]")]
    assert len(backward_reads) == 4
    shared = set.intersection(*backward_reads)
    assert shared  # the parameter copies of micro-batch 0
    freed_at_once = {slot for ins in instructions if ins.name.startswith("forward")
                     for slot in ins.frees if slot in ins.writes}
    assert freed_at_once  # the copies of micro-batches 1..3, never read
