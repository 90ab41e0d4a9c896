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
