"""Plan quality: the automatic plan against Megatron-LM's own published layouts, priced by the
same model (simulation only, no devices).

For each point of ../shared/design/GPU_REFERENCE.md section 1 (Megatron-LM weak scaling on
A100, SC'21 Table 1) it prices Megatron's layout as published (t, p, micro-batch 1, full
recomputation) under 1F1B, interleaved 1F1B (2 chunks per stage) and ZB-H1, the best
Megatron-style grid layout (`--method megatron`: every dp x tp x pp, micro-batch count and
remat choice), then runs the automatic search (`alpa-lite plan` defaults: remat auto,
schedule auto) and prints the predicted step times, the speedup of the automatic plan over
Megatron's published layout (its faster of 1F1B and interleaved, as the paper's PTD-P) and
over the best grid layout, what it chose and how long it searched. Run:

    python benchmarks/bench_plan_quality.py                 # every point (hours on 2 cores)
    python benchmarks/bench_plan_quality.py --points 1.7 3.6  # by size (billions)
    python benchmarks/bench_plan_quality.py --layouts-only   # Megatron's layouts only (~1 min)
    python benchmarks/bench_plan_quality.py --points --others  # Alpa's six GPT sizes and
                                                             # seed 001's LLaMA2-13B only

``--others`` adds the clusters without a published Megatron layout: Alpa's six GPT sizes on
V100-16GB hosts (OSDI'22 section 8.1: batch 1024, sequence 1024, float16 compute) and seed
001's LLaMA2-13B on 50 x 4 V100-32GB, each against the best grid layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

from bench_gpu_calibration import MEGATRON_A100, SEQ, VOCAB  # noqa: E402

from alpa_lite.cluster import get_cluster_preset  # noqa: E402
from alpa_lite.layout import Layout  # noqa: E402
from alpa_lite.models.presets import custom_preset, get_preset  # noqa: E402
from alpa_lite.simulate import simulate  # noqa: E402

SCHEDULES = ("1f1b", "interleaved-1f1b", "zb-h1")


def _model(row):
    _, heads, hidden, layers, _, _, _, batch, _ = row
    return custom_preset("gpt", hidden=hidden, num_layers=layers, heads=heads, vocab=VOCAB,
                         seq_len=SEQ, batch=batch).with_overrides(dtype="bfloat16")


def _megatron(row, schedule: str):
    """Megatron's published layout under ``schedule`` (None where it cannot run)."""
    _, _, _, layers, t, p, gpus, _, _ = row
    if schedule != "1f1b" and p == 1:
        return None  # one stage: no pipeline schedule to change
    cluster = get_cluster_preset("a100-80gb-8x").with_hosts(gpus // 8)
    try:
        return simulate(_model(row), cluster, layout=Layout(
            method="megatron", tp=t, pp=p, micro_batch_size=1, remat="layer",
            schedule=schedule))
    except Exception as err:  # noqa: BLE001 - reported in the table
        print(f"  ({row[0]}B {schedule}: {err})", file=sys.stderr)
        return None


def _auto(row):
    cluster = get_cluster_preset("a100-80gb-8x").with_hosts(row[6] // 8)
    return simulate(_model(row), cluster, remat="auto", progress=True)


def _choice(plan) -> str:
    info = plan.extra
    chunks = f" x{info.virtual_stages}" if info.virtual_stages > 1 else ""
    remat = sum(st.remat for st in plan.stages)
    return (f"{info.schedule}{chunks}, {len(plan.stages)} stages, remat {remat}/"
            f"{len(plan.stages)}, k={plan.num_micro_batches}")


def _grid(row):
    """The best Megatron-style grid layout (every dp x tp x pp, micro-batch count, remat)."""
    cluster = get_cluster_preset("a100-80gb-8x").with_hosts(row[6] // 8)
    return simulate(_model(row), cluster, method="megatron", remat="auto")


# (model preset, cluster, device preset, CLI overrides) of the clusters without a published
# Megatron layout
OTHERS = [(name, hosts, "v100-16gb-4x", dict(batch_size=1024, seq_len=1024, dtype="float16"))
          for name, hosts in (("gpt-350m", "1x1"), ("gpt-1.3b", "1x4"), ("gpt-2.6b", "1x8"),
                              ("gpt-6.7b", "2x8"), ("gpt-15b", "4x8"), ("gpt-39b", "8x8"))] + [
    ("llama2-13b", "50x4", "v100-32gb-4x", dict(dtype="float16"))]


def _other(case, method: str):
    name, shape, device, overrides = case  # as `alpa-lite plan --cluster shape --device`
    hosts, per_host = (int(x) for x in shape.split("x"))
    cluster = dataclasses.replace(get_cluster_preset(device), num_hosts=hosts,
                                  devices_per_host=per_host)
    if device == "v100-32gb-4x":
        cluster = cluster.with_memory("32GiB")
    return simulate(get_preset(name).with_overrides(**overrides), cluster, method=method,
                    remat="auto", progress=method == "auto")


def _seconds(plan) -> str:
    if plan is None:
        return "-"
    return f"{plan.predicted_step_time_s:.3f}" + ("" if plan.extra.fits_memory else " (OOM)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=float, nargs="*", default=None,
                        help="model sizes in billions (default: all ten)")
    parser.add_argument("--layouts-only", action="store_true")
    parser.add_argument("--others", action="store_true",
                        help="also Alpa's six GPT sizes and seed 001's LLaMA2-13B")
    args = parser.parse_args()
    rows = [r for r in MEGATRON_A100 if args.points is None or r[0] in args.points]
    print(f"Command: `python {' '.join(sys.argv)}`  ")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}\n")
    print("| model (B) | GPUs | t/p | Megatron 1F1B (s) | interleaved x2 (s) | ZB-H1 (s) "
          "| best grid (s) | auto (s) | auto vs Megatron | auto vs grid | auto chose "
          "| search (s) |")
    print("|--:|--:|:--|--:|--:|--:|--:|--:|--:|--:|:--|--:|")
    for row in rows:
        params, _, _, _, t, p, gpus, _, _ = row
        auto = grid = None
        if not args.layouts_only:  # the search first, timed from empty caches
            auto = _auto(row)
            grid = _grid(row)  # reuses the search's layer prices
        named = {s: _megatron(row, s) for s in SCHEDULES}
        # Megatron as published: 1F1B, or interleaved where that is faster (the paper's PTD-P)
        published = min((named[s].predicted_step_time_s for s in ("1f1b", "interleaved-1f1b")
                         if named[s] is not None))
        cells = ["-"] * 5 if auto is None else [
            _seconds(auto), f"{published / auto.predicted_step_time_s:.2f}x",
            f"{grid.predicted_step_time_s / auto.predicted_step_time_s:.2f}x", _choice(auto),
            f"{auto.plan_time_s:.0f}"]
        print(f"| {params} | {gpus} | {t}/{p} | {_seconds(named['1f1b'])} "
              f"| {_seconds(named['interleaved-1f1b'])} | {_seconds(named['zb-h1'])} "
              f"| {_seconds(grid)} | " + " | ".join(cells) + " |", flush=True)
    if args.others:
        print("\n| model | cluster | best grid (s) | auto (s) | auto vs grid | auto chose "
              "| search (s) |")
        print("|:--|:--|--:|--:|--:|:--|--:|")
        for case in OTHERS:
            auto, grid = _other(case, "auto"), _other(case, "megatron")
            print(f"| {case[0]} | {case[1]} {case[2]} | {_seconds(grid)} | {_seconds(auto)} "
                  f"| {grid.predicted_step_time_s / auto.predicted_step_time_s:.2f}x "
                  f"| {_choice(auto)} | {auto.plan_time_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
