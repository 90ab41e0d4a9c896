"""Two processes x 4 CPU devices on 127.0.0.1: every method equals serial jax.jit.

Each test starts its processes under ``timeout -s KILL`` (jax swallows SIGTERM) and, through
the launcher or directly, kills them by their own pid on the way out. ``worker.py`` holds the
per-process code; it prints ``OK <case> process <i>`` for each passed case.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
WORKER = str(HERE / "worker.py")
LAUNCH = [sys.executable, "-m", "alpa_lite.cli", "launch"]
CASES = ["data", "zero2", "zero3", "shard24", "shard_micro", "pipeline2", "pipeline_uneven",
         "pipeline_wide_stage", "pipeline_donated", "pipeline_auto", "local_batch", "keys",
         "stage_placement"]


def launch(*cases: str, timeout_s: int = 400) -> tuple[int, str, float]:
    command = ["timeout", "-s", "KILL", str(timeout_s)] + LAUNCH + [
        "--num-processes", "2", "--devices-per-process", "4", "--grace-period", "3", "--",
        sys.executable, WORKER, *cases]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent.parent)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


def passed(output: str) -> set[tuple[str, str]]:
    return set(re.findall(r"^\[(\d)\] OK (\w+) process \1$", output, flags=re.M))


def test_every_method_across_two_processes_equals_serial():
    code, output, _ = launch(*CASES)
    assert code == 0, output[-6000:]
    assert passed(output) == {(p, c) for p in "01" for c in CASES}, output[-6000:]
    assert "[0] SOURCE alpa-lite launch process 0 of 2" in output


def test_training_loops_of_several_methods_log_the_loss_on_every_process():
    code, output, _ = launch("training_loop")
    assert code == 0, output[-6000:]
    loops = ["loop_pipeline2", "loop_data", "loop_shard_micro", "loop_pipeline_auto",
             "loop_jax_pipeline2", "loop_jax_shard_micro"]
    assert passed(output) == {(p, c) for p in "01" for c in loops}, output[-6000:]


def test_a_plan_mismatch_fails_every_process_instead_of_hanging():
    code, output, seconds = launch("mismatch", timeout_s=120)
    assert code == 1, output[-4000:]
    assert "PlanMismatchError" in output and "UNREACHED" not in output
    # process 1 says why, and passes it to process 0, which fails with it too; whichever
    # prints first (once process 0 exits, process 1 may be ended before its traceback)
    assert "Process 1 is planning a different call than process 0" in output
    assert seconds < 100


def test_a_process_dying_after_initialization_ends_the_job():
    code, output, seconds = launch("die", timeout_s=120)
    assert code == 3, output[-4000:]
    assert "process 1 exited with status 3" in output
    assert seconds < 110


def _slurm_port_job_id() -> int:
    """A job id whose Slurm coordinator port (61440 + id % 4096) is free here."""
    for job_id in range(os.getpid() % 4096, os.getpid() % 4096 + 4096):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 61440 + job_id % 4096))
                return job_id
            except OSError:
                continue
    pytest.skip("no free port in Slurm's range 61440..65535")


def test_initialize_finds_a_slurm_job_without_the_launcher():
    job_id = _slurm_port_job_id()
    processes = []
    try:
        for rank in range(2):
            env = {k: v for k, v in os.environ.items() if not k.startswith("ALPA_LITE_")}
            env.update({
                "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
                "SLURM_STEP_NUM_NODES": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
            processes.append(subprocess.Popen(
                ["timeout", "-s", "KILL", "240", sys.executable, WORKER, "data"], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                cwd=HERE.parent.parent))
        outputs = [p.communicate(timeout=250)[0] for p in processes]
    finally:
        for p in processes:  # by our own pid, never by name
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, output) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, output[-4000:]
        assert f"SOURCE slurm process {rank} of 2" in output, output[-4000:]
        assert f"OK data process {rank}" in output


def test_the_multihost_example_trains_under_the_launcher():
    command = ["timeout", "-s", "KILL", "300"] + LAUNCH + [
        "--num-processes", "2", "--devices-per-process", "4", "--", sys.executable,
        "examples/multihost_train.py", "--method", "pipeshard", "--steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent.parent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"^\[0\] step \d: loss ([\d.]+)", result.stdout,
                                           flags=re.M)]
    assert len(losses) == 2 and losses[1] < losses[0], result.stdout[-3000:]
    assert "[0] 2 process(es) (alpa-lite launch), 8 devices" in result.stdout
