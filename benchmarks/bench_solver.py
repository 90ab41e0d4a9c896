"""ILP size and solve time for a GPT train step of several depths on a (2, 4) mesh.

Plans from abstract shapes (no weights are allocated), so the figures are the planner's own
cost. Run:

    python benchmarks/bench_solver.py --layers 2 4 8 12 24
    python benchmarks/bench_solver.py --scan-layers --layers 8 64 256 1024

``--scan-layers`` builds the GPT with ``scan_layers=True`` (one `flax.linen.scan` over the
blocks): the scan body is planned once, so the ILP does not grow with depth.

Prints a markdown table (also written to docs/benchmarks/solver.md with --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite.models.presets import get_preset  # noqa: E402
from alpa_lite.models.train import build_workload  # noqa: E402


def measure(num_layers: int, args) -> dict:
    preset = get_preset(args.model).with_overrides(num_layers=num_layers,
                                                   batch_size=args.batch_size)
    if args.scan_layers:
        preset = dataclasses.replace(
            preset, config=dataclasses.replace(preset.config, scan_layers=True))
    work = build_workload(preset, abstract=True)
    share = {"auto": None, "on": True, "off": False}[args.share]
    method = alpa_lite.ShardParallel(mesh_shape=tuple(args.mesh), solver_time_limit_s=600,
                                     share_repeated_layers=share)
    p = alpa_lite.parallelize(work.train_step, method=method)
    start = time.perf_counter()
    plan = p.plan(work.state, work.batch)
    total = time.perf_counter() - start
    s = plan.sharding.solver
    return {"layers": num_layers, "operators": s["num_units"], "groups": s["num_groups"],
            "edges": s["num_edges"], "variables": s["num_variables"],
            "constraints": s["num_constraints"], "build_s": s["build_time_s"],
            "solve_s": s["solve_time_s"], "total_s": total, "status": s["status"],
            "objective": plan.objective, "classes": s.get("num_classes")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-tiny")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 12, 24])
    parser.add_argument("--mesh", type=int, nargs=2, default=[2, 4])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--share", choices=["auto", "on", "off"], default="auto",
                        help="repeated-layer strategy sharing (auto: on for large graphs)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="the model scans over its blocks (flax nn.scan)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [measure(n, args) for n in args.layers]
    lines = [
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"model {args.model} (batch {args.batch_size}"
        f"{', scan_layers=True' if args.scan_layers else ''}), mesh {tuple(args.mesh)}",
        "",
        "| layers | operators | groups | ILP classes | ILP variables | constraints | build (s) "
        "| solve (s) | total plan (s) | objective (s) | status |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|",
    ]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['operators']} | {r['groups']} | {r['classes']} | "
                     f"{r['variables']} | {r['constraints']} | {r['build_s']:.2f} | "
                     f"{r['solve_s']:.2f} | {r['total_s']:.2f} | {r['objective']:.4g} | "
                     f"{r['status']} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
