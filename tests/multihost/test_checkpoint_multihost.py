"""Checkpoints across processes: saved on 2 processes x 4 CPU devices, restored on 1 process
(8 devices) under another method, and vice versa; both equal an uninterrupted serial run.

The 2-process jobs run under ``timeout -s KILL`` through the launcher, which ends its
processes by their own pid.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax
import optax
import pytest

import alpa_lite
from alpa_lite import checkpoint
from alpa_lite.testing import assert_trees_close

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "end_to_end"))
from tiny_models import make_mlp, mse_step  # noqa: E402

WORKER = str(HERE / "checkpoint_worker.py")


def launch(mode: str, directory: Path) -> str:
    command = ["timeout", "-s", "KILL", "240", sys.executable, "-m", "alpa_lite.cli", "launch",
               "--num-processes", "2", "--devices-per-process", "4", "--grace-period", "3",
               "--", sys.executable, WORKER, mode, str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent.parent)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert set(re.findall(rf"^\[(\d)\] OK {mode} process \1$", output, flags=re.M)) == \
        {"0", "1"}, output[-6000:]
    return output


def make():
    state, batch = make_mlp(32, 16, 4, optimizer=optax.sgd(0.1, momentum=0.9),
                            manual_boundaries=True)
    return state.replace(step=jax.numpy.asarray(state.step, jax.numpy.int32)), batch


def serial(state, batch, num_steps):
    for _ in range(num_steps):
        state, loss = jax.jit(mse_step)(state, batch)
    return state, loss


@pytest.mark.parametrize("mode,method", [("save", "ShardParallel"),
                                         ("save_pipeline", "PipeshardParallel")])
def test_saved_on_two_processes_resumes_on_one_under_data_parallel(mode, method, tmp_path):
    launch(mode, tmp_path)
    assert checkpoint.load_plan(tmp_path).method == method
    state, batch = make()
    p = alpa_lite.parallelize(mse_step, method=alpa_lite.DataParallel())
    like = jax.eval_shape(lambda: state)
    restored = checkpoint.restore(tmp_path, like=like, shardings=p.input_shardings(like, batch)[0])
    for _ in range(2):
        restored, loss = p(restored, batch)
    expected, expected_loss = serial(state, batch, 4)
    assert_trees_close((restored.params, restored.opt_state, loss),
                       (expected.params, expected.opt_state, expected_loss), rtol=1e-5, atol=1e-6)


def test_saved_on_one_process_resumes_on_two_in_a_pipeline(tmp_path):
    state, batch = make()
    p = alpa_lite.parallelize(mse_step, method=alpa_lite.Zero3Parallel())
    for _ in range(2):
        state, _ = p(state, batch)
    checkpoint.save(tmp_path, state, step=2)
    launch("resume", tmp_path)
