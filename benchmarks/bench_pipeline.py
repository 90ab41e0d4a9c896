"""Pipeline driver overhead: Python time per program launch, and step time, on CPU devices.

A tiny MLP (so device work is negligible) is pipelined over S stages with M micro-batches;
the driver's dispatch time (the call returns before the devices finish: dispatch is
asynchronous) divided by the number of launches (the executable's instructions: stage
programs, batched cross-mesh moves, batch splits, accumulator programs) is the per-launch
overhead. Run:

    python benchmarks/bench_pipeline.py --stages 2 4 8 --micro-batches 4 16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite.models.mlp import MLP  # noqa: E402
from alpa_lite.models.train import create_train_state, make_batch, make_train_step  # noqa: E402


def measure(num_stages: int, num_micro_batches: int, repeats: int) -> dict:
    model = MLP(hidden=32, num_layers=num_stages, out=32, in_features=32)
    batch = make_batch(model, 8 * num_micro_batches, 0)
    state = create_train_state(model, 0, 8 * num_micro_batches, optax.sgd(0.1))
    method = alpa_lite.PipeshardParallel(
        num_micro_batches=num_micro_batches,
        layer_option=alpa_lite.AutoLayerOption(layer_num=num_stages),
        stage_option=alpa_lite.UniformStageOption(num_stages=num_stages))
    step = alpa_lite.parallelize(make_train_step(model, optax.sgd(0.1)), method=method)
    executable = step.get_executable(state, batch)
    # Every instruction is one launch: a stage program, a batched cross-mesh move, a batch
    # split, an accumulator zeroing or finishing program, or an apply program.
    launches = len(executable.instructions)
    jax.block_until_ready(step(state, batch))
    dispatch, total = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = step(state, batch)
        dispatch.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        total.append(time.perf_counter() - start)
    return {"stages": num_stages, "micro_batches": num_micro_batches, "launches": launches,
            "dispatch_s": float(np.median(dispatch)), "step_s": float(np.median(total))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"Command: `python {' '.join(sys.argv)}`  ")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"{len(jax.devices())} simulated {jax.devices()[0].platform} devices\n")
    print("| stages | micro-batches | launches/step | dispatch (ms) | us per launch "
          "| step incl. compute (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in args.stages:
        for m in args.micro_batches:
            r = measure(s, m, args.repeats)
            print(f"| {s} | {m} | {r['launches']} | {r['dispatch_s'] * 1e3:.1f} | "
                  f"{r['dispatch_s'] / r['launches'] * 1e6:.0f} | {r['step_s'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
