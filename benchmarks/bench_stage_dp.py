"""Search time of the stage-construction DP (`alpa_lite.inter_op.stage_dp.solve_stage_dp`).

Builds random `StageProblem`s shaped like real ones and prints a markdown table of solve times:

* layer ``l`` takes ``w_l ~ U(0.8, 1.2)`` ms per micro-batch on one device;
* a stage of layers ``k..i`` on an ``h x w`` submesh of ``n = h w`` devices takes
  ``sum w_l / n * (1 + 0.1 log2 n) * (1.3 if h > 1 else 1)`` ms times ``U(0.95, 1.05)`` noise
  (intra-op communication grows with the mesh and is slower across hosts);
* with ``--memory`` limits on, a stage holds ``4 P`` bytes of parameters and optimizer state per
  layer plus ``A`` bytes of activations per layer and micro-batch in flight, spread over its
  devices; the per-device budget is 1.5x an even split of the whole model, so limits bind for small
  submeshes and deep stages.

Usage::

    python benchmarks/bench_stage_dp.py
    python benchmarks/bench_stage_dp.py --layers 32 128 --hosts 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np

from alpa_lite.inter_op.stage_dp import StageProblem, enumerate_submesh_shapes, solve_stage_dp

DEVICES_PER_HOST = 8
PARAM_BYTES_PER_LAYER = 1.0
ACTIVATION_BYTES_PER_LAYER = 1.0


def build_problem(
    num_layers: int, num_hosts: int, num_micro_batches: int, *, memory: bool, seed: int
) -> StageProblem:
    """A random problem with the cost and memory model of the module docstring."""
    rng = np.random.default_rng(seed)
    shapes = enumerate_submesh_shapes(num_hosts, DEVICES_PER_HOST)
    sizes = np.array([hosts * width for hosts, width in shapes], dtype=np.float64)
    across_hosts = np.array([1.3 if hosts > 1 else 1.0 for hosts, _ in shapes])
    prefix_ms = np.concatenate([[0.0], np.cumsum(rng.uniform(0.8, 1.2, num_layers))])
    span_ms = prefix_ms[None, 1:] - prefix_ms[:-1, None]  # [k, i] = sum of w_k..w_i
    layers = np.arange(num_layers)[None, :] - np.arange(num_layers)[:, None] + 1
    shape = (num_layers, num_layers, len(shapes))
    overhead = (1.0 + 0.1 * np.log2(sizes)) * across_hosts
    cost_ms = span_ms[:, :, None] / sizes * overhead * rng.uniform(0.95, 1.05, shape)
    cost_s = np.where(layers[:, :, None] >= 1, cost_ms * 1e-3, np.inf)
    limits = None
    if memory:
        num_devices = num_hosts * DEVICES_PER_HOST
        budget_bytes = 1.5 * num_layers / num_devices * (
            4 * PARAM_BYTES_PER_LAYER + ACTIVATION_BYTES_PER_LAYER
        )
        depth = np.maximum(layers, 1)[:, :, None]
        free_bytes = budget_bytes * sizes - 4 * PARAM_BYTES_PER_LAYER * depth
        limits = np.floor(free_bytes / (ACTIVATION_BYTES_PER_LAYER * depth)) - 1
    num_devices = num_hosts * DEVICES_PER_HOST
    sizes_tuple = tuple(int(size) for size in sizes)
    return StageProblem(num_layers, num_devices, num_micro_batches, sizes_tuple, cost_s, limits)


def measure(problem: StageProblem, repeats: int, optimality_gap: float) -> tuple[float, object]:
    """Median wall time in seconds over `repeats` solves, and the solution."""
    times_s = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        solution = solve_stage_dp(problem, optimality_gap=optimality_gap)
        times_s.append(time.perf_counter() - start_s)
    return statistics.median(times_s), solution


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 8],
                        help=f"hosts of {DEVICES_PER_HOST} devices each")
    parser.add_argument("--micro-batches", type=int, default=64)
    parser.add_argument("--memory", choices=["off", "on", "both"], default="both",
                        help="memory limits (max_n_succ_stages)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimality-gap", type=float, default=0.0,
                        help="0 = exact; g > 0 accepts plans within a factor 1 + g")
    args = parser.parse_args(argv)
    memory_modes = {"off": [False], "on": [True], "both": [False, True]}[args.memory]

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}")
    print(f"command: {shlex.join([sys.executable] + sys.argv)}")
    print()
    print("| layers | devices | memory limits | t_max candidates | stages | latency (ms) "
          "| solve time (s) |")
    print("|---:|---:|:---:|---:|---:|---:|---:|")
    for num_hosts in args.hosts:
        for num_layers in args.layers:
            for memory in memory_modes:
                problem = build_problem(num_layers, num_hosts, args.micro_batches,
                                        memory=memory, seed=args.seed)
                solve_s, solution = measure(problem, args.repeats, args.optimality_gap)
                candidates = np.unique(problem.stage_cost_s[np.isfinite(problem.stage_cost_s)])
                print(f"| {num_layers} | {problem.num_devices} | {'on' if memory else 'off'} "
                      f"| {candidates.size} | {len(solution.stages)} "
                      f"| {solution.cost_s * 1e3:.2f} | {solve_s:.3f} |", flush=True)


if __name__ == "__main__":
    main()
