"""Search cost of the automatic planner vs model depth and cluster size (simulation only).

Plans GPT-1.3B-width models of 8..1024 layers on one 8-GPU host and GPT-39B on 8x8 GPUs with
`alpa_lite.simulate` (abstract shapes, no devices), and prints the seconds spent next to the
figures the Aceso paper reports. Run:

    python benchmarks/bench_search.py
    python benchmarks/bench_search.py --layers 8 32 --skip-39b      # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

from alpa_lite.cluster import get_cluster_preset  # noqa: E402
from alpa_lite.models.presets import get_preset  # noqa: E402
from alpa_lite.simulate import simulate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32, 128, 512, 1024])
    parser.add_argument("--device", default="a100-80gb-8x")
    parser.add_argument("--skip-39b", action="store_true")
    args = parser.parse_args()
    print(f"Command: `python {' '.join(sys.argv)}`  ")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}; "
          f"cluster preset {args.device}\n")
    print("| model | layers | cluster | search (s) | predicted step (s) | memory/device (GiB) "
          "| fits | stages |")
    print("|---|---:|---|---:|---:|---:|:--:|---:|")
    one_host = get_cluster_preset(args.device)
    runs = [("gpt-1.3b", n, one_host) for n in args.layers]
    if not args.skip_39b:
        runs.append(("gpt-39b", 48, one_host.with_hosts(8)))
    for name, layers, cluster in runs:
        result = simulate(get_preset(name).with_overrides(num_layers=layers), cluster)
        fits = result.peak_memory_bytes <= cluster.memory_per_device_bytes
        print(f"| {name} | {layers} | {cluster.num_hosts}x{cluster.devices_per_host} | "
              f"{result.plan_time_s:.1f} | {result.predicted_step_time_s:.4g} | "
              f"{result.peak_memory_bytes / 2**30:.1f} | {'yes' if fits else 'no'} | "
              f"{len(result.stages)} |")


if __name__ == "__main__":
    main()
