"""Run under `alpa-lite launch --num-processes 2 --devices-per-process 4`: checkpoints across
processes (each process writes and reads only its own shards, through orbax).

``save DIR``: 2 steps under ShardParallel (2, 4) (the state spans both processes), saved as
step 2; ``save_pipeline DIR`` the same under a 2-stage pipeline (one stage per process,
so each process holds only some leaves). ``resume DIR``: restores the step a single process saved into a 2-stage pipeline's
shardings (one stage per process), runs 2 more steps and checks them against 4 serial steps.
Prints ``OK <mode> process <i>``.
"""

import sys

import alpa_lite
from alpa_lite import checkpoint, distributed

info = distributed.initialize()

import jax  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/end_to_end")
from tiny_models import make_mlp, mse_step  # noqa: E402

from alpa_lite.config import PipeshardParallel, UniformStageOption  # noqa: E402
from alpa_lite.testing import assert_trees_close  # noqa: E402


def make():
    state, batch = make_mlp(32, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9),
                            manual_boundaries=True)
    state = state.replace(step=jax.numpy.asarray(state.step, jax.numpy.int32))
    return jax.device_get((state, batch))  # the same host values on every process


def pipeline():
    return PipeshardParallel(num_micro_batches=2, layer_option="manual",
                             stage_option=UniformStageOption(num_stages=2))


def save(directory: str, method=None) -> None:
    state, batch = make()
    p = alpa_lite.parallelize(mse_step,
                              method=method or alpa_lite.ShardParallel(mesh_shape=(2, 4)))
    for _ in range(2):
        state, _ = p(state, batch)
    assert not all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(state.params))
    checkpoint.save(directory, state, step=2, plan=p.plan(state, batch))
    mode = "save" if method is None else "save_pipeline"
    print(f"OK {mode} process {jax.process_index()}", flush=True)


def resume(directory: str) -> None:
    state, batch = make()
    expected = state
    for _ in range(4):
        expected, expected_loss = jax.jit(mse_step)(expected, batch)
    p = alpa_lite.parallelize(mse_step, method=pipeline())
    like = jax.eval_shape(lambda: state)
    restored = checkpoint.restore(directory, like=like,
                                  shardings=p.input_shardings(like, batch)[0])
    assert checkpoint.latest_step(directory) == 2 and int(distributed.to_host(restored.step)) == 2
    for _ in range(2):
        restored, loss = p(restored, batch)
    got = distributed.to_host((restored.params, restored.opt_state, loss))
    assert_trees_close(got, jax.device_get((expected.params, expected.opt_state, expected_loss)),
                       rtol=1e-5, atol=1e-6)
    print(f"OK resume process {jax.process_index()}", flush=True)


if __name__ == "__main__":
    modes = {"save": save, "save_pipeline": lambda d: save(d, pipeline()), "resume": resume}
    modes[sys.argv[1]](sys.argv[2])
