"""The call path: no re-plan or recompile for an ordinary TrainState, ShapeDtypeStructs for
lower, one-stage pipelines as ShardParallel, and clear errors for bad input."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import alpa_lite
from alpa_lite.emit.executable import ShardExecutable


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        alpa_lite.mark_pipeline_boundary()
        return nn.Dense(4)(x)


def make_state(tx=None):
    model = Net()
    params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=tx or optax.sgd(0.1, momentum=0.9))


def train_step(state, batch):
    def loss_fn(params):
        return jnp.mean((state.apply_fn({"params": params}, batch["x"]) - batch["y"]) ** 2)
    loss, grads = alpa_lite.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def make_batch(size=16):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(size, 8)).astype(np.float32),
            "y": rng.normal(size=(size, 4)).astype(np.float32)}


def test_train_state_with_python_int_step_plans_and_compiles_once():
    state, batch = make_state(), make_batch()
    assert isinstance(state.step, int)  # flax's TrainState.create leaves a Python int
    p = alpa_lite.parallelize(train_step, method=alpa_lite.DataParallel(mesh_shape=(4,)))
    serial, serial_state = jax.jit(train_step), state
    for _ in range(3):
        state, _ = p(state, batch)
        serial_state, _ = serial(serial_state, batch)
    assert p.num_plans == 1
    # No more jit cache entries than jax.jit itself makes (a Python int, then a weak int32
    # array: 2); the first call places the state, so the program is compiled once.
    assert p.get_executable(state, batch)._jitted._cache_size() == 1
    assert serial._cache_size() == 2
    assert int(state.step) == 3 and state.step.weak_type == serial_state.step.weak_type


def test_misplaced_arguments_are_moved_not_rejected():
    state, batch = make_state(), make_batch()
    p = alpa_lite.parallelize(train_step, method=alpa_lite.ShardParallel(mesh_shape=(2, 4)))
    expected = jax.jit(train_step)(state, batch)
    elsewhere = jax.device_put(state, jax.devices()[5])  # committed to one other device
    alpa_lite.testing.assert_trees_close(p(elsewhere, batch), expected, rtol=1e-5, atol=1e-6)
    alpa_lite.testing.assert_trees_close(p(state, batch), expected, rtol=1e-5, atol=1e-6)
    assert p.num_plans == 1


def test_lower_accepts_shape_dtype_structs():
    state, batch = make_state(), make_batch()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x),
                                                                     jnp.asarray(x).dtype),
                                      (state, batch))
    p = alpa_lite.parallelize(train_step, method=alpa_lite.DataParallel(mesh_shape=(4,)))
    text = p.lower(*abstract).compile().as_text()
    assert "all-reduce" in text


def test_one_stage_pipeline_runs_as_shard_parallel():
    state, batch = make_state(), make_batch()
    method = alpa_lite.PipeshardParallel(num_micro_batches=2,
                                         stage_option=alpa_lite.UniformStageOption(num_stages=1))
    p = alpa_lite.parallelize(train_step, method=method)
    out = p(state, batch)
    alpa_lite.testing.assert_trees_close(out, jax.jit(train_step)(state, batch), rtol=1e-5,
                                         atol=1e-6)
    assert isinstance(p.get_executable(state, batch), ShardExecutable)
    plan = p.plan(state, batch)
    assert plan.method == "PipeshardParallel"
    assert isinstance(plan.extra, alpa_lite.plan.OneStageInfo)
    # its prediction is that of the ShardParallel plan it runs (gradient sync once per step)
    shard = alpa_lite.parallelize(train_step, method=alpa_lite.ShardParallel(
        mesh_shape=plan.extra.logical_mesh, num_micro_batches=2)).plan(state, batch)
    assert plan.predicted_step_time_s == pytest.approx(shard.predicted_step_time_s, rel=1e-9)
    saved = alpa_lite.ParallelPlan.from_json(plan.to_json())
    assert saved.predicted_step_time_s == plan.predicted_step_time_s


def test_batch_argnums_out_of_range_is_an_error():
    p = alpa_lite.parallelize(train_step, batch_argnums=(2,))
    with pytest.raises(alpa_lite.InvalidConfigError, match=r"batch_argnums contains 2 .* 2 "):
        p(make_state(), make_batch())


def test_batch_argnums_on_the_optimizer_state_is_an_error():
    tx = optax.adam(1e-3)
    params = make_state().params

    def step(params, opt_state, batch):
        grads = alpa_lite.grad(lambda p: jnp.mean(Net().apply({"params": p}, batch["x"])))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    p = alpa_lite.parallelize(step, method=alpa_lite.DataParallel(mesh_shape=(4,)))
    with pytest.raises(alpa_lite.InvalidConfigError, match="batch_argnums=.2,."):
        p(params, tx.init(params), make_batch())  # default batch_argnums=(1,): opt_state
    fixed = alpa_lite.parallelize(step, method=alpa_lite.Zero2Parallel(mesh_shape=(4,)),
                                  batch_argnums=(2,))
    args = (params, tx.init(params), make_batch())
    alpa_lite.testing.assert_trees_close(fixed(*args), jax.jit(step)(*args), rtol=1e-5,
                                         atol=1e-6)
    # The optimizer state is found by its optax type although nothing is named "opt_state".
    plan = fixed.plan(*args)
    sharded = [spec for name, spec in zip(plan.sharding.input_names, plan.sharding.input_specs)
               if name.startswith("arg1") and any(spec)]
    assert sharded, plan.sharding.input_names


def test_zero_without_optimizer_state_is_an_error():
    def step(params, batch):
        grads = alpa_lite.grad(lambda p: jnp.mean(Net().apply({"params": p}, batch["x"])))(params)
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)

    p = alpa_lite.parallelize(step, method=alpa_lite.Zero2Parallel(mesh_shape=(4,)))
    with pytest.raises(alpa_lite.InvalidConfigError, match="no optimizer state was found"):
        p(make_state().params, make_batch())


def test_keyword_arguments_are_an_error():
    p = alpa_lite.parallelize(train_step)
    with pytest.raises(alpa_lite.InvalidConfigError, match="positional arguments only"):
        p(make_state(), batch=make_batch())


def test_pipeline_donates_the_state_it_updates():
    method = alpa_lite.PipeshardParallel(num_micro_batches=2, stage_option="uniform")
    p = alpa_lite.parallelize(train_step, method=method, donate_argnums=(0,))
    kept = alpa_lite.parallelize(train_step, method=method)
    batch, serial = make_batch(), jax.jit(train_step)
    state, expected = make_state(), make_state()  # the first call may donate its input too
    for _ in range(3):
        old = state
        state, loss = p(state, batch)
        expected, expected_loss = serial(expected, batch)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    # the last call read arrays living on the stage meshes: the update reused their buffers
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves((old.params,
                                                                  old.opt_state)))
    for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    new, _ = kept(state, batch)  # without donate_argnums nothing is deleted
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state))


def test_pipeline_rejects_plans_of_another_method():
    method = alpa_lite.PipeshardParallel(num_micro_batches=2, stage_option="uniform")
    p = alpa_lite.parallelize(train_step, method=method)
    plan = p.plan(make_state(), make_batch())
    shard = alpa_lite.parallelize(train_step, method=alpa_lite.ShardParallel())
    with pytest.raises(alpa_lite.InvalidConfigError, match="PipeshardParallel plan for a "
                                                           "ShardParallel function"):
        shard.use_plan(plan)


def test_solver_fallback_warns_once_per_plan(monkeypatch):
    import alpa_lite.intra_op.planner as planner

    original = planner.solve_sharding_problem

    def timed_out(*args, **kwargs):
        return dataclasses.replace(original(*args, **kwargs), status="fallback")

    monkeypatch.setattr(planner, "solve_sharding_problem", timed_out)
    p = alpa_lite.parallelize(train_step, method=alpa_lite.ShardParallel(mesh_shape=(4,)))
    state, batch = make_state(), make_batch()
    with pytest.warns(UserWarning, match="greedy fallback") as record:
        state, _ = p(state, batch)
        p(state, batch)
    assert len([r for r in record if "greedy" in str(r.message)]) == 1 and p.num_plans == 1


def test_pipeline_value_read_before_it_exists_is_an_internal_error():
    method = alpa_lite.PipeshardParallel(num_micro_batches=2, stage_option="uniform")
    p = alpa_lite.parallelize(train_step, method=method)
    executable = p.get_executable(make_state(), make_batch())
    from alpa_lite.emit.pipeline import _ScheduleBuilder

    builder = _ScheduleBuilder(executable)
    builder.position, builder.pre_values = {}, set()
    with pytest.raises(RuntimeError, match="internal error"):
        builder.read(10**6, 0, executable.replicated(0), [])
