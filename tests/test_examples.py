"""Smoke test of the examples: `compare_methods.py --quick` runs and ends with its verdict.

Runs in a subprocess (the example sets XLA_FLAGS itself, as a user would run it).
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_compare_methods_quick_prints_a_verdict():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "compare_methods.py"),
                           "--quick", "--repeats", "2"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("Verdict: "), proc.stdout[-2000:]
    assert "won at" in lines[-1] and "DataParallel" in lines[-1]
    table = [line for line in lines if line.startswith(("DataParallel", "ShardParallel"))]
    assert len(table) == 2 and all(line.endswith("yes") for line in table), proc.stdout


def test_train_gpt_quick_resumes_on_another_method_on_the_serial_loss_curve(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_gpt.py"), "--quick",
                           "--out-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("OK: the resumed run continues the serial loss curve"), lines
    assert "resumed from step 8" in proc.stdout and "with data" in proc.stdout
    assert (tmp_path / "train_gpt_loss.png").stat().st_size > 10_000
    assert (tmp_path / "ckpt" / "16" / "plan").is_dir()  # the plan is saved with the state
