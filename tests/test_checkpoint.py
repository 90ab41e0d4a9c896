"""alpa_lite.checkpoint: round trips for every method, resume on another mesh or method equals
an uninterrupted serial run, saved plans, async saves, the SIGKILL-mid-save drill, errors.

Exactness: SGD with momentum; a resumed run may differ from serial jax.jit only by float
summation order (rtol 1e-5, as for the uninterrupted parallel runs).
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import alpa_lite
import alpa_lite.inter_op.driver as pipeline_driver
import alpa_lite.intra_op.driver as single_mesh_driver
import alpa_lite.inter_op.pricing as pricing_module
from alpa_lite import checkpoint
from alpa_lite.config import (AutoLayerOption, DataParallel, PipeshardParallel, ShardParallel,
                              UniformStageOption, Zero2Parallel, Zero3Parallel)
from alpa_lite.testing import assert_trees_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6


class MLP(nn.Module):
    hidden: int = 16
    num_layers: int = 4

    @nn.compact
    def __call__(self, x):
        for _ in range(self.num_layers - 1):
            x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.hidden)(x)


def make_state(batch_size=32, hidden=16):
    model = MLP(hidden)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(batch_size, hidden)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(batch_size, hidden)), jnp.float32)}
    params = model.init(jax.random.PRNGKey(0), batch["x"])
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=optax.sgd(0.1, momentum=0.9))
    return state, batch


def mse_step(state, batch):
    def loss_fn(params):
        return jnp.mean((state.apply_fn(params, batch["x"]) - batch["y"]) ** 2)

    loss, grads = alpa_lite.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


PIPELINE = PipeshardParallel(num_micro_batches=2, layer_option=AutoLayerOption(layer_num=2),
                             stage_option=UniformStageOption(num_stages=2))
METHODS = {"shard(2,4)": ShardParallel(mesh_shape=(2, 4)),
           "shard(4,2)": ShardParallel(mesh_shape=(4, 2)),
           "data": DataParallel(), "zero2": Zero2Parallel(), "zero3": Zero3Parallel(),
           "pipeline": PIPELINE}


def run(step_fn, state, batch, num_steps):
    losses = []
    for _ in range(num_steps):
        state, loss = step_fn(state, batch)
        losses.append(float(loss))
    return state, losses


def abstract(tree):
    """`jax.ShapeDtypeStruct`s of a state (a fresh TrainState's step is a Python int)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype), tree)


def array_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]


@pytest.mark.parametrize("name", ["shard(2,4)", "data", "zero2", "zero3", "pipeline"])
def test_round_trip_places_every_leaf_where_the_plan_wants_it(name, tmp_path):
    state, batch = make_state()
    p = alpa_lite.parallelize(mse_step, method=METHODS[name])
    state, _ = p(state, batch)
    checkpoint.save(tmp_path, state, step=1)
    shardings = p.input_shardings(state, batch)[0]
    restored = checkpoint.restore(tmp_path, like=abstract(state), shardings=shardings)
    assert_trees_close(restored.params, state.params, rtol=0, atol=0)
    assert_trees_close(restored.opt_state, state.opt_state, rtol=0, atol=0)
    wanted = jax.tree_util.tree_leaves(shardings,
                                       is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for leaf, sharding in zip(array_leaves(restored), wanted):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    if name == "pipeline":  # the state spans both stages' submeshes
        assert len({frozenset(s.device_set) for s in wanted}) >= 2
    next_state, _ = p(restored, batch)  # runs without moving anything
    assert int(next_state.step) == 2


def test_restore_without_shardings_is_whole_on_the_first_device(tmp_path):
    state, batch = make_state()
    state, _ = alpa_lite.parallelize(mse_step, method=METHODS["shard(2,4)"])(state, batch)
    checkpoint.save(tmp_path, state, step=3)
    restored = checkpoint.restore(tmp_path, like=state)  # arrays as `like` work too
    for leaf in array_leaves(restored):
        assert leaf.sharding.device_set == {jax.local_devices()[0]}
    assert_trees_close(restored.params, state.params, rtol=0, atol=0)
    assert restored.apply_fn is state.apply_fn  # non-array parts come from `like`
    fresh, _ = make_state()  # its step is the Python int 0
    assert int(checkpoint.restore(tmp_path, like=fresh).step) == 1


@pytest.mark.parametrize("before,after", [("shard(2,4)", "shard(4,2)"), ("shard(2,4)", "data"),
                                          ("data", "zero3"), ("zero3", "pipeline"),
                                          ("pipeline", "zero2")])
def test_resume_on_another_mesh_or_method_equals_an_uninterrupted_serial_run(
        before, after, tmp_path):
    state, batch = make_state()
    expected_state, expected_losses = run(jax.jit(mse_step), state, batch, 4)

    first = alpa_lite.parallelize(mse_step, method=METHODS[before])
    mid_state, losses = run(first, state, batch, 2)
    checkpoint.save(tmp_path, mid_state, step=2)
    del mid_state

    second = alpa_lite.parallelize(mse_step, method=METHODS[after])
    like = abstract(state)
    resumed = checkpoint.restore(tmp_path, like=like,
                                 shardings=second.input_shardings(like, batch)[0])
    assert int(resumed.step) == 2
    final_state, more_losses = run(second, resumed, batch, 2)
    assert_trees_close(losses + more_losses, expected_losses, rtol=RTOL, atol=ATOL)
    assert_trees_close(final_state.params, expected_state.params, rtol=RTOL, atol=ATOL)
    assert_trees_close(final_state.opt_state, expected_state.opt_state, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["shard(2,4)", "pipeline"])
def test_the_saved_plan_resumes_without_solving(name, tmp_path, monkeypatch):
    state, batch = make_state()
    # A fresh TrainState's step is a (weakly typed) Python int, a restored one an int32 array:
    # make it an array first so that the plan fits the restored state.
    state = state.replace(step=jnp.asarray(state.step, jnp.int32))
    p = alpa_lite.parallelize(mse_step, method=METHODS[name])
    saved = p(state, batch)[0]
    plan = p.plan(state, batch)
    checkpoint.save(tmp_path, saved, step=1, plan=plan)
    loaded = checkpoint.load_plan(tmp_path)
    assert loaded.to_json() == plan.to_json()

    def no_solving(*args, **kwargs):
        raise AssertionError("a loaded plan must not be solved again")

    monkeypatch.setattr(single_mesh_driver, "solve_intra_op", no_solving)
    monkeypatch.setattr(pipeline_driver, "solve_intra_op", no_solving)
    monkeypatch.setattr(pricing_module, "solve_planning_problem", no_solving)
    resumed_p = alpa_lite.parallelize(mse_step, method=METHODS[name]).use_plan(loaded)
    like = abstract(state)
    resumed = checkpoint.restore(tmp_path, like=like,
                                 shardings=resumed_p.input_shardings(like, batch)[0])
    final, _ = resumed_p(resumed, batch)
    expected, _ = run(jax.jit(mse_step), state, batch, 2)
    assert_trees_close(final.params, expected.params, rtol=RTOL, atol=ATOL)


def test_no_plan_saved_loads_none(tmp_path):
    checkpoint.save(tmp_path, {"w": jnp.ones(3)}, step=0)
    assert checkpoint.load_plan(tmp_path) is None


def test_async_save_max_to_keep_and_latest_step(tmp_path):
    assert checkpoint.latest_step(tmp_path / "absent") is None
    assert checkpoint.all_steps(tmp_path) == []
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2, async_=True) as ckpt:
        for step in range(4):
            state = {"w": jnp.full((64, 64), float(step))}
            ckpt.save(state, step)
            state["w"].delete()  # the async save returned after copying it to the host
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
    assert checkpoint.latest_step(tmp_path) == 3
    restored = checkpoint.restore(tmp_path, like={"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)},
                                  step=2)
    assert float(restored["w"][0, 0]) == float(restored["w"][-1, -1]) == 2.0


SAVER = """
import sys, jax.numpy as jnp
from alpa_lite import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1], max_to_keep=2)
for step in range(1000):
    ckpt.save({"w": jnp.full((%d,), float(step)), "b": jnp.full((7,), float(step))}, step)
    print(step, flush=True)
"""


def test_sigkill_mid_save_leaves_a_complete_latest_step(tmp_path):
    directory = tmp_path / "ckpt"
    size = 32 * 2**20 // 4  # 32 MiB per save: each takes measurable time
    proc = subprocess.Popen([sys.executable, "-c", SAVER % size, str(directory)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        for _ in range(2):  # two steps complete
            assert proc.stdout.readline().strip(), "the saver died before saving"
        deadline = time.monotonic() + 60
        while not any("tmp" in p.name for p in directory.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "no save in flight"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of writing a step
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in directory.iterdir() if "tmp" in p.name]
    assert leftovers, "the kill should have caught a save in flight"
    step = checkpoint.latest_step(directory)
    assert step is not None and step >= 1
    like = {"w": jax.ShapeDtypeStruct((size,), jnp.float32),
            "b": jax.ShapeDtypeStruct((7,), jnp.float32)}
    restored = checkpoint.restore(directory, like=like)
    assert float(restored["w"][0]) == float(restored["w"][-1]) == float(step)
    assert float(restored["b"][3]) == float(step)


def test_missing_foreign_and_truncated_directories_are_clear_errors(tmp_path):
    like = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.restore(tmp_path / "nowhere", like=like)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint step.*weights"):
        checkpoint.restore(foreign, like=like)
    good = tmp_path / "good"
    checkpoint.save(good, {"w": jnp.ones(3)}, step=5)
    with pytest.raises(checkpoint.CheckpointError, match=r"Step 4 is not in .*\[5\]"):
        checkpoint.restore(good, like=like, step=4)
    (good / "5" / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="truncated.*manifest.ocdbt"):
        checkpoint.restore(good, like=like)


def test_a_like_that_does_not_fit_names_the_leaf(tmp_path):
    checkpoint.save(tmp_path, {"layer": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}}, step=1)
    f32 = jnp.float32
    with pytest.raises(checkpoint.CheckpointError, match=r"'layer.w'.*float32\[2, 3\].*\[3, 2\]"):
        checkpoint.restore(tmp_path, like={"layer": {"w": jax.ShapeDtypeStruct((2, 3), f32),
                                                     "b": jax.ShapeDtypeStruct((2,), f32)}})
    with pytest.raises(checkpoint.CheckpointError, match=r"'layer.b'.*int32"):
        checkpoint.restore(tmp_path, like={"layer": {"w": jax.ShapeDtypeStruct((3, 2), f32),
                                                     "b": jax.ShapeDtypeStruct((2,), jnp.int32)}})
    with pytest.raises(checkpoint.CheckpointError, match=r"'layer.c' of `like` is not in"):
        checkpoint.restore(tmp_path, like={"layer": {"c": jax.ShapeDtypeStruct((2,), f32)}})
    with pytest.raises(checkpoint.CheckpointError, match="`shardings` has 1 leaves"):
        checkpoint.restore(tmp_path, like={"layer": {"w": jax.ShapeDtypeStruct((3, 2), f32),
                                                     "b": jax.ShapeDtypeStruct((2,), f32)}},
                           shardings={"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])})


def test_bad_save_arguments_are_clear_errors(tmp_path):
    checkpoint.save(tmp_path, {"w": jnp.ones(3)}, step=1)
    with pytest.raises(checkpoint.CheckpointError, match="Step 1 is already saved"):
        checkpoint.save(tmp_path, {"w": jnp.ones(3)}, step=1)
    with pytest.raises(checkpoint.CheckpointError, match="non-negative int"):
        checkpoint.save(tmp_path, {"w": jnp.ones(3)}, step=-1)
    with pytest.raises(checkpoint.CheckpointError, match="max_to_keep must be a positive int"):
        checkpoint.Checkpointer(tmp_path, max_to_keep=0)


def test_input_shardings_has_one_entry_per_argument_and_none_for_static_ones():
    def f(w, x, scale):
        return jnp.sum(x @ w) * scale

    w, x = jnp.ones((8, 8)), jnp.ones((16, 8))
    p = alpa_lite.parallelize(f, method=DataParallel(), static_argnums=2)
    shardings = p.input_shardings(w, x, 2.0)
    assert len(shardings) == 3 and shardings[2] is None
    assert shardings[0].is_fully_replicated  # data parallel: weights replicated
    assert not shardings[1].is_fully_replicated  # the batch is split over the devices
    assert float(p(jax.device_put(w, shardings[0]), jax.device_put(x, shardings[1]), 2.0)) \
        == float(jax.jit(f, static_argnums=2)(w, x, 2.0))
