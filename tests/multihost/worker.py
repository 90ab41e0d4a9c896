"""Run under `alpa-lite launch --num-processes 2 --devices-per-process 4`: every method
across two processes equals serial `jax.jit` (loss and parameters after 2 steps).

Each process prints ``OK <case>`` per passed case; the test counts them.
"""

import sys

import alpa_lite
from alpa_lite import distributed

info = distributed.initialize()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/end_to_end")
from tiny_models import make_mlp, mse_step  # noqa: E402

from alpa_lite.config import (AutoLayerOption, ManualStageOption, PipeshardParallel,  # noqa
                              UniformStageOption)
from alpa_lite.testing import assert_trees_close  # noqa: E402

CASES = {
    "data": lambda: alpa_lite.DataParallel(),
    "zero2": lambda: alpa_lite.Zero2Parallel(),
    "zero3": lambda: alpa_lite.Zero3Parallel(),
    "shard24": lambda: alpa_lite.ShardParallel(mesh_shape=(2, 4)),
    "shard_micro": lambda: alpa_lite.ShardParallel(mesh_shape=(8,), num_micro_batches=2),
    "pipeline2": lambda: PipeshardParallel(num_micro_batches=4, layer_option="manual",
                                           stage_option=UniformStageOption(num_stages=2)),
    "pipeline_uneven": lambda: PipeshardParallel(
        num_micro_batches=2, layer_option="manual",
        stage_option=ManualStageOption(forward_stage_layer_ids=((0,), (1, 2), (3,)),
                                       submesh_shapes=((1, 2), (1, 4), (1, 2)))),
    "pipeline_wide_stage": lambda: PipeshardParallel(
        num_micro_batches=4, layer_option="manual",
        stage_option=ManualStageOption(forward_stage_layer_ids=((0, 1), (2, 3)),
                                       submesh_shapes=((2, 2), (2, 2)))),
    "pipeline_donated": lambda: PipeshardParallel(num_micro_batches=4, layer_option="manual",
                                                  stage_option=UniformStageOption(num_stages=2)),
    "pipeline_zb_h1": lambda: PipeshardParallel(num_micro_batches=4, layer_option="manual",
                                                stage_option=UniformStageOption(num_stages=2),
                                                schedule="zb-h1"),
    "pipeline_interleaved": lambda: PipeshardParallel(
        num_micro_batches=4, layer_option="manual",
        stage_option=UniformStageOption(num_stages=2), schedule="interleaved-1f1b"),
    "pipeline_auto": lambda: PipeshardParallel(num_micro_batches=2,
                                               layer_option=AutoLayerOption(layer_num=4),
                                               stage_option="auto"),
}


def run(name: str) -> None:
    state, batch = make_mlp(32, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9),
                            manual_boundaries=name.startswith("pipeline"))
    state, batch = jax.device_get((state, batch))  # the same host values on every process
    donate = (0,) if name.endswith("donated") else ()
    p = alpa_lite.parallelize(mse_step, method=CASES[name](), donate_argnums=donate)
    expected_state, losses = state, []
    serial = jax.jit(mse_step)
    for _ in range(2):
        expected_state, loss = serial(expected_state, batch)
        losses.append(loss)
    actual_state, actual_losses = state, []
    for _ in range(2):
        previous = actual_state
        actual_state, loss = p(actual_state, batch)
        actual_losses.append(loss)
    # the second step read arrays on the stage meshes: donated, their buffers were reused
    # (each process's own; a stage on the other process's devices has none here)
    assert all(x.is_deleted() == bool(donate) for x in jax.tree_util.tree_leaves(
        previous.params) if x.sharding.addressable_devices), name
    leaves = jax.tree_util.tree_leaves((actual_state.params, actual_losses))
    assert all(isinstance(x, jax.Array) for x in leaves)
    if jax.process_count() > 1:
        assert not all(x.is_fully_addressable for x in leaves), name
    got = distributed.to_host((actual_state.params, actual_state.opt_state, actual_losses))
    assert_trees_close(got, jax.device_get((expected_state.params, expected_state.opt_state,
                                            losses)), rtol=1e-5, atol=1e-6)
    print(f"OK {name} process {jax.process_index()}", flush=True)


def run_local_batch() -> None:
    """Each process passes only its own rows (global_batch_from_local), to a data-parallel
    step (the batch already lies on the right devices) and to a pipeline (whose first stage
    holds only some of them)."""
    state, batch = make_mlp(32, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9),
                            manual_boundaries=True)
    state, batch = jax.device_get((state, batch))
    rows = len(batch["x"]) // jax.process_count()
    mine = jax.tree_util.tree_map(lambda x: x[jax.process_index() * rows:][:rows], batch)
    global_batch = distributed.global_batch_from_local(mine)
    assert global_batch["x"].shape == batch["x"].shape
    want_state, want_loss = jax.jit(mse_step)(state, batch)
    for method in (alpa_lite.DataParallel(), CASES["pipeline2"]()):
        got_state, got_loss = alpa_lite.parallelize(mse_step, method=method)(state,
                                                                             global_batch)
        assert_trees_close(distributed.to_host((got_state.params, got_loss)),
                           jax.device_get((want_state.params, want_loss)), rtol=1e-5,
                           atol=1e-6)
    print(f"OK local_batch process {jax.process_index()}", flush=True)


def dropout_step(state, batch):
    def loss_fn(params):
        keep = jax.random.bernoulli(batch["key"], 0.8, batch["y"].shape)
        out = state.apply_fn(params, batch["x"]) * keep
        return jnp.mean((out - batch["y"]) ** 2)

    loss, grads = alpa_lite.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def run_keys() -> None:
    """A typed PRNG key in the batch (dropout) crosses into global arrays and stages."""
    state, batch = make_mlp(32, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9),
                            manual_boundaries=True)
    state, batch = jax.device_get((state, batch))
    batch["key"] = jax.random.key(7)
    want_state, want_loss = jax.jit(dropout_step)(state, batch)
    for method in (alpa_lite.DataParallel(), CASES["pipeline2"]()):
        p = alpa_lite.parallelize(dropout_step, method=method)
        got_state, got_loss = p(state, batch)
        got_state, got_loss = p(got_state, batch)  # state back in, from the stage meshes
        want2_state, want2_loss = jax.jit(dropout_step)(want_state, batch)
        assert_trees_close(distributed.to_host((got_state.params, got_loss)),
                           jax.device_get((want2_state.params, want2_loss)), rtol=1e-5,
                           atol=1e-6)
    print(f"OK keys process {jax.process_index()}", flush=True)


def run_stage_placement() -> None:
    """A 2-stage pipeline puts its stages on different processes and moves values between
    them with the cross-process collective, never device_put."""
    state, batch = make_mlp(32, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9),
                            manual_boundaries=True)
    state, batch = jax.device_get((state, batch))
    p = alpa_lite.parallelize(mse_step, method=CASES["pipeline2"]())
    p(state, batch)
    executable = p._last
    owners = [{d.process_index for d in mesh.devices.flat} for mesh in executable.meshes]
    assert owners == [{0}, {1}], owners
    names = [i.name for i in executable.instructions]
    assert any(n.startswith("transfer->") for n in names), names
    assert not any(n.startswith("move->") for n in names), names
    print(f"OK stage_placement process {jax.process_index()}", flush=True)


def run_training_loop() -> None:
    """Several methods in a row, each a 3-step loop on fresh host batches that logs
    ``float(loss)`` on every process (a pipeline's loss lives on one stage's devices, so it
    must be made readable everywhere), equal to serial jax.jit."""
    state, batch = jax.device_get(make_mlp(32, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9),
                                           manual_boundaries=True))
    rng = np.random.default_rng(0)  # the same batches on every process
    batches = [jax.tree_util.tree_map(
        lambda x: (x + rng.normal(size=x.shape)).astype(x.dtype), batch) for _ in range(3)]
    serial, expected, losses = jax.jit(mse_step), state, []
    for b in batches:
        expected, loss = serial(expected, b)
        losses.append(float(loss))
    runs = [(name, mse_step) for name in ("pipeline2", "data", "shard_micro", "pipeline_auto")]
    # the same step differentiated by jax itself: boundary and layers found in the program
    runs += [(f"jax_{name}", jax_mse_step) for name in ("pipeline2", "shard_micro")]
    for name, train_step in runs:
        p = alpa_lite.parallelize(train_step, method=CASES[name.removeprefix("jax_")]())
        current = state
        for step, b in enumerate(batches):
            current, loss = p(current, b)
            logged = float(loss)  # what a training script logs, on every process
            assert abs(logged - losses[step]) <= 1e-5 * max(1.0, abs(losses[step])), (
                name, step, logged, losses[step])
        print(f"OK loop_{name} process {jax.process_index()}", flush=True)


def jax_mse_step(state, batch):
    def loss_fn(params):
        return jnp.mean((state.apply_fn(params, batch["x"]) - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def run_mismatch() -> None:
    """Process 1 calls with another batch size: every process must fail, none hang."""
    state, batch = make_mlp(32 if jax.process_index() == 0 else 16, 16, 4)
    state, batch = jax.device_get((state, batch))
    alpa_lite.parallelize(mse_step, method=alpa_lite.DataParallel())(state, batch)
    print("UNREACHED: the mismatch was not detected", flush=True)


def run_die() -> None:
    """Process 1 dies right after initialization; process 0 goes on into collectives."""
    import os

    if jax.process_index() == 1:
        os._exit(3)
    run("data")


if __name__ == "__main__":
    assert info.num_processes == jax.process_count()
    assert distributed.initialize() is info  # a second call is harmless
    print(f"SOURCE {info.source} process {jax.process_index()} of {jax.process_count()}",
          flush=True)
    special = {"local_batch": run_local_batch, "keys": run_keys, "stage_placement": run_stage_placement,
               "mismatch": run_mismatch, "die": run_die,
               "training_loop": run_training_loop}
    for case in sys.argv[1:] or list(CASES) + ["local_batch", "keys", "stage_placement"]:
        special[case]() if case in special else run(case)
