"""Search cost of the automatic planner at scale (simulation only, no devices).

Plans the cases issue 25 sets search-time targets for, with `alpa-lite plan`'s defaults
(remat auto, schedule auto, the device's half-precision compute, layer pricing on every
core), and prints the seconds each search took next to its target:

- GPT-39B on 8x8 V100-16GB (Alpa's GPT-3 setting: batch 1024, sequence 1024): <= 60 s
- LLaMA2-13B on 50x4 V100-32GB (seed 001): <= 120 s
- every point of ../shared/design/GPU_REFERENCE.md section 1 (Megatron-LM on A100) up to
  145.6B on 1,536 GPUs: <= 60 s each; GPT-1T on 3,072 A100s: <= 600 s
- a 1,024-layer GPT-1.3B-width model on 1x8 A100: <= 30 s

Run:

    python benchmarks/bench_search.py                   # every case (about an hour here)
    python benchmarks/bench_search.py --cases gpt-39b llama2-13b deep
    python benchmarks/bench_search.py --cases megatron-1.7 megatron-145.6
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

from bench_gpu_calibration import MEGATRON_A100, SEQ, VOCAB  # noqa: E402

from alpa_lite.cluster import get_cluster_preset  # noqa: E402
from alpa_lite.models.presets import custom_preset, get_preset  # noqa: E402
from alpa_lite.simulate import simulate  # noqa: E402

GIB = 2**30


def _cases() -> dict:
    """name -> (model preset, cluster, target seconds)."""
    v100_16 = get_cluster_preset("v100-16gb-4x")
    v100_32 = get_cluster_preset("v100-32gb-4x")
    a100 = get_cluster_preset("a100-80gb-8x")
    cases = {
        "gpt-39b": (get_preset("gpt-39b").with_overrides(batch_size=1024, seq_len=1024,
                                                       dtype="float16"),
                    dataclasses.replace(v100_16, num_hosts=8, devices_per_host=8), 60.0),
        "llama2-13b": (get_preset("llama2-13b").with_overrides(dtype="float16"),
                       v100_32.with_hosts(50).with_memory(32 * GIB), 120.0),
        "deep": (get_preset("gpt-1.3b").with_overrides(num_layers=1024, dtype="bfloat16"),
                 a100, 30.0),
    }
    for size, heads, hidden, layers, _, _, gpus, batch, _ in MEGATRON_A100:
        model = custom_preset("gpt", hidden=hidden, num_layers=layers, heads=heads,
                              vocab=VOCAB, seq_len=SEQ, batch=batch).with_overrides(
                                  dtype="bfloat16")
        cases[f"megatron-{size:g}"] = (model, a100.with_hosts(gpus // 8),
                                       600.0 if size > 1000 else 60.0 if size <= 145.6
                                       else None)
    return cases


def main() -> None:
    cases = _cases()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(cases), choices=list(cases))
    parser.add_argument("--workers", type=int, default=None,
                        help="layer-pricing processes (default: one per core)")
    args = parser.parse_args()
    print(f"Command: `python {' '.join(sys.argv)}`  ")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}\n")
    print("| case | model | cluster | search (s) | target (s) | met | predicted step (s) "
          "| memory/device (GiB) | fits | stages | schedule |")
    print("|---|---|---|---:|---:|:--:|---:|---:|:--:|---:|---|")
    for name in args.cases:
        preset, cluster, target = cases[name]
        start = time.perf_counter()
        result = simulate(preset, cluster, remat="auto", workers=args.workers)
        seconds = time.perf_counter() - start
        info = result.extra
        met = "-" if target is None else ("yes" if seconds <= target else "no")
        print(f"| {name} | {preset.name} | {cluster.num_hosts}x{cluster.devices_per_host} | "
              f"{seconds:.1f} | {target if target is not None else '-'} | {met} | "
              f"{result.predicted_step_time_s:.4g} | {result.peak_memory_bytes / GIB:.1f} | "
              f"{'yes' if info.fits_memory else 'no'} | {len(result.stages)} | "
              f"{info.schedule} |", flush=True)


if __name__ == "__main__":
    main()
