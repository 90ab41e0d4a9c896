"""Cost-model accuracy: predicted vs measured step time (and memory) for a set of plans.

Plans a tiny GPT with several methods and meshes, runs each on the local (simulated CPU)
devices and compares the planner's prediction (``ParallelPlan.predicted_step_time_s``;
default CPU link model: alpha 5 us, 10 GB/s per mesh axis, 50 GFLOP/s per device) with the
measured step time: an Aceso-style accuracy table (actual, predicted, error %) and the Spearman
rank correlation of the two orderings (does the model rank plans right even where its absolute
numbers are off?). Memory: the plan's predicted peak vs XLA's ``memory_analysis()`` of the
compiled SPMD program (ShardParallel family only). Run:

    python benchmarks/bench_cost_model.py

Writes ``docs/benchmarks/cost_model.md`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_throughput import (Runner, build, describe, machine_info, pipeline,  # noqa: E402
                              run_runners)

import alpa_lite  # noqa: E402


def ranks(values) -> list[float]:
    """Ranks 1..n, ties get their average rank (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of the ranks."""
    import numpy as np

    if len(x) < 2:
        return math.nan
    rx, ry = np.array(ranks(list(x))), np.array(ranks(list(y)))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom else math.nan


def plans(args) -> list[tuple[str, object]]:
    uniform = alpa_lite.ManualStageOption(
        forward_stage_layer_ids=((0, 1), (2, 3)), submesh_shapes=((1, 4), (1, 4)),
        logical_mesh_shapes=((2, 2), (2, 2)))
    return [
        ("DataParallel (8,)", alpa_lite.DataParallel()),
        ("Zero2Parallel (8,)", alpa_lite.Zero2Parallel()),
        ("Zero3Parallel (8,)", alpa_lite.Zero3Parallel()),
        (f"DataParallel (8,) x {args.micro_batches} micro-batches",
         alpa_lite.DataParallel(num_micro_batches=args.micro_batches)),
        ("ShardParallel (8,)", alpa_lite.ShardParallel()),
        ("ShardParallel (4, 2)", alpa_lite.ShardParallel(mesh_shape=(4, 2))),
        ("ShardParallel (2, 4)", alpa_lite.ShardParallel(mesh_shape=(2, 4))),
        (f"ShardParallel (4, 2) x {args.micro_batches} micro-batches",
         alpa_lite.ShardParallel(mesh_shape=(4, 2), num_micro_batches=args.micro_batches)),
        ("Pipeshard 2 stages x (2, 2)", pipeline(args, uniform)),
        ("PipeshardParallel (auto)", pipeline(args, "auto")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-tiny")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=None, help="override the model width")
    parser.add_argument("--heads", type=int, default=None, help="override the head count")
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary")
    parser.add_argument("--seq-len", type=int, default=None, help="override the sequence")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--no-write", dest="write", action="store_false")
    parser.add_argument("--profile", default=None, metavar="DB.json",
                        help="price plans with this profile database (from alpa-lite profile "
                             "comm|compute --out DB.json): parallelize(..., cluster="
                             "ClusterSpec.from_devices(profile=...))")
    args = parser.parse_args()
    args.cluster = None
    if args.profile:
        args.cluster = alpa_lite.ClusterSpec.from_devices(
            profile=alpa_lite.ProfileDatabase.load(args.profile))
    args.pipeline_layers, args.memory = args.layers, True
    command = f"python {' '.join(sys.argv)}"
    print(f"Command: `{command}`\n{machine_info()}", flush=True)
    start = time.perf_counter()
    work = build(args)
    runners = [Runner("serial jax.jit", "1 device", None, work, args)]
    runners += [Runner(name, "", method, work, args) for name, method in plans(args)]
    results = [r for r in run_runners(runners, args)[1:] if not r.error]
    failed = [r for r in runners[1:] if r.result.error]

    lines = [f"Command: `{command}`  ",
             machine_info() + f" (at the end; {time.perf_counter() - start:.0f} s in all)  ",
             describe(work, args), "",
             "| plan | actual (ms) | predicted (ms) | error % | actual/predicted | "
             "measured peak mem (MiB) | predicted mem (MiB) | mem error % | matches serial |",
             "|:--|---:|---:|---:|---:|---:|---:|---:|:--|"]
    for r in results:
        err = abs(r.predicted_s - r.step_s) / r.step_s * 100
        mem, mem_err = "n/a", "n/a"
        if r.measured_mem:
            mem = f"{r.measured_mem / 2**20:.2f}"
            mem_err = f"{abs(r.predicted_mem - r.measured_mem) / r.measured_mem * 100:.0f}"
        lines.append(f"| {r.name} | {r.step_s * 1e3:.1f} | {r.predicted_s * 1e3:.3f} | "
                     f"{err:.1f} | {r.step_s / r.predicted_s:.0f}x | {mem} | "
                     f"{r.predicted_mem / 2**20:.2f} | {mem_err} | {r.matches} |")
    for r in failed:
        lines.append(f"| {r.result.name} | failed: {r.result.error} ||||||||")

    time_rho = spearman([r.predicted_s for r in results], [r.step_s for r in results])
    shard = [r for r in results if r.measured_mem]
    mem_rho = spearman([r.predicted_mem for r in shard], [r.measured_mem for r in shard])
    single = [r for r in results if r.kind == "shard"]
    single_rho = spearman([r.predicted_s for r in single], [r.step_s for r in single])
    errors = sorted(abs(r.predicted_s - r.step_s) / r.step_s * 100 for r in results)
    best_pred = min(results, key=lambda r: r.predicted_s)
    best_meas = min(results, key=lambda r: r.step_s)
    lines += ["",
              f"Spearman rank correlation, predicted vs measured step time: {time_rho:.2f} "
              f"over {len(results)} plans; {single_rho:.2f} over the {len(single)} single-mesh "
              "plans (no pipelines).  ",
              f"Spearman rank correlation, predicted vs measured peak memory: {mem_rho:.2f} "
              f"over {len(shard)} single-mesh plans.  ",
              f"Median step-time error {errors[len(errors) // 2]:.1f} %.  "
              f"Fastest predicted: {best_pred.name}; fastest measured: {best_meas.name}."]
    text = "\n".join(lines)
    print("\n" + text)
    if args.write:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir,
                            "cost_model_profiled.md" if args.profile else "cost_model.md")
        with open(path, "w") as f:
            f.write(text + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
