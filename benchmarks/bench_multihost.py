"""Two processes on one machine: step time per method, and intra- vs inter-process bandwidth.

Loopback CPU figures: both processes run on this machine (2 x 4 simulated CPU devices, gloo
over 127.0.0.1), so "inter-process" is a TCP loopback, not a network. They show what the
multi-process path costs against one process with the same 8 devices, not cluster numbers.

For each method, a 2-layer GPT (hidden 64, batch 16, SGD with momentum) runs ``--steps``
steps (each blocked on) after a warm-up step; the median step is reported, once in 2 processes
x 4 devices (under ``alpa-lite launch``) and once in 1 process x 8 devices, in the same run.
Then ``alpa-lite profile comm`` under the launcher measures all-reduce within a process
(intra) and across the two (inter).

Run:

    python benchmarks/bench_multihost.py          # prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("data", "zero3", "shard24", "pipeline2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(steps: int) -> None:
    """One measurement run (in each process of a job, or alone)."""
    from alpa_lite import distributed

    distributed.initialize()
    import jax
    import numpy as np
    import optax

    import alpa_lite
    from alpa_lite.models import build_workload, get_preset

    methods = {
        "data": alpa_lite.DataParallel(),
        "zero3": alpa_lite.Zero3Parallel(),
        "shard24": alpa_lite.ShardParallel(mesh_shape=(2, 4)),
        "pipeline2": alpa_lite.PipeshardParallel(
            num_micro_batches=4, layer_option=alpa_lite.AutoLayerOption(layer_num=2),
            stage_option=alpa_lite.UniformStageOption(num_stages=2)),
    }
    preset = get_preset("gpt-tiny").with_overrides(num_layers=2, batch_size=16)
    work = build_workload(preset, optimizer=optax.sgd(0.01, momentum=0.9))
    state0, batch = jax.device_get((work.state, work.batch))
    batch = jax.tree_util.tree_map(np.asarray, batch)
    for name in METHODS:
        step = alpa_lite.parallelize(work.train_step, method=methods[name])
        state, loss = step(state0, batch)  # plan, compile, warm up
        jax.block_until_ready(loss)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, loss = step(state, batch)
            jax.block_until_ready((state, loss))
            times.append(time.perf_counter() - start)
        if jax.process_index() == 0:
            print("RESULT " + json.dumps({"method": name, "processes": jax.process_count(),
                                          "median_s": statistics.median(times)}), flush=True)


def run(command: list[str], env: dict | None = None) -> str:
    result = subprocess.run(["timeout", "-s", "KILL", "900"] + command, capture_output=True,
                            text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}"
                 f"{result.stderr[-3000:]}")
    return result.stdout


def results(output: str) -> dict:
    rows = {}
    for line in output.splitlines():
        if "RESULT " in line:
            row = json.loads(line.split("RESULT ", 1)[1])
            rows[row["method"]] = row["median_s"]
    return rows


def bus_bandwidth(output: str) -> dict:
    """Average all-reduce bus bandwidth per (group size, groups, link) from the table."""
    found, current = {}, None
    for line in output.splitlines():
        line = line.split("] ", 1)[-1]
        if line.startswith("# all-reduce:"):
            words = line.split()
            current = (int(words[5]), int(words[2]), words[-1].split("-")[0])
        elif line.startswith("# Avg bus bandwidth") and current:
            found[current] = float(line.split(":")[1].split()[0])
            current = None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps)
        return
    me = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps)]
    launch = [sys.executable, "-m", "alpa_lite.cli", "launch", "--num-processes", "2",
              "--devices-per-process", "4", "--"]
    two = results(run(launch + me))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    one = results(run(me, env))
    with tempfile.TemporaryDirectory() as tmp:
        profile = run(launch + [sys.executable, "-m", "alpa_lite.cli", "profile", "comm",
                                "--kinds", "all-reduce",
                                "--group-sizes", "2,8", "--max-bytes", "16MiB", "--repeats",
                                "5", "--no-progress", "--out", os.path.join(tmp, "db.json")])
    bandwidth = bus_bandwidth(profile)
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores; "
          f"command: python benchmarks/bench_multihost.py --steps {args.steps}\n")
    print("| method | 1 process x 8 devices (ms) | 2 processes x 4 devices (ms) | ratio |")
    print("|---|---|---|---|")
    for name in METHODS:
        print(f"| {name} | {one[name] * 1e3:.1f} | {two[name] * 1e3:.1f} | "
              f"{two[name] / one[name]:.2f} |")
    print("\n| all-reduce, average bus bandwidth (loopback CPU) | GB/s |\n|---|---|")
    for (size, groups, link), value in sorted(bandwidth.items()):
        print(f"| {groups} group(s) of {size} devices, {link}-process | {value:.3f} |")


if __name__ == "__main__":
    main()
