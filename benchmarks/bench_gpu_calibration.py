"""The GPU device model against Megatron-LM's ten published A100 points.

Source: Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters
Using Megatron-LM" (SC'21, arXiv 2104.04473), Table 1 (copied into
../shared/design/GPU_REFERENCE.md section 1): GPT models from 1.7B to 1T parameters on 32 to
3,072 A100-SXM4-80GB (DGX A100, 8 x HDR 200 Gb/s per node), vocabulary 51,200, sequence
2,048, mixed precision, full activation recomputation. The measured step time of a row is
``F / (TFLOP/s per GPU x GPUs)`` with the paper's flop count
``F = 96 B s l h^2 (1 + s / (6 h) + V / (16 l h))``.

Each row is priced as a named layout, exactly what `alpa-lite plan` runs for the command the
table prints: Megatron with the row's t and p, d = GPUs / (t p), micro-batch size 1 (the
paper does not list its micro-batch sizes; 1 is its most common choice for large models),
1F1B, every block rematerialized, on the `a100-80gb-8x` preset. The preset's constants are
in `alpa_lite/cluster.py` with their sources; ``--matmul-efficiency`` etc. override them to
see how the table moves. Run:

    python benchmarks/bench_gpu_calibration.py

Writes ``docs/benchmarks/gpu_calibration.md`` (``--out-dir``). No GPU is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

from alpa_lite.cluster import get_cluster_preset
from alpa_lite.layout import Layout
from alpa_lite.models.presets import custom_preset
from alpa_lite.simulate import simulate

SEQ, VOCAB = 2048, 51200
# params (B), heads, hidden, layers, t, p, GPUs, global batch, measured TFLOP/s per GPU
MEGATRON_A100 = (
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
)


def paper_flops(batch: int, layers: int, hidden: int) -> float:
    """Megatron-LM's flops per iteration (with the recomputed forward)."""
    return 96 * batch * SEQ * layers * hidden**2 * (
        1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))


def command(row) -> str:
    _, heads, hidden, layers, t, p, gpus, batch, _ = row
    return (f"alpa-lite plan --model gpt --hidden {hidden} --num-layers {layers} --heads "
            f"{heads} --vocab {VOCAB} --seq-len {SEQ} --batch-size {batch} --cluster "
            f"{gpus // 8}x8 --device a100-80gb-8x --method megatron --tp {t} --pp {p} "
            "--micro-batch-size 1 --remat layer")


def predict(row, cluster_overrides: dict, explain: bool = False):
    params, heads, hidden, layers, t, p, gpus, batch, _ = row
    preset = custom_preset("gpt", hidden=hidden, num_layers=layers, heads=heads, vocab=VOCAB,
                           seq_len=SEQ, batch=batch).with_overrides(dtype="bfloat16")
    cluster = dataclasses.replace(get_cluster_preset("a100-80gb-8x").with_hosts(gpus // 8),
                                  **cluster_overrides)
    return simulate(preset, cluster, layout=Layout(method="megatron", tp=t, pp=p,
                                                   micro_batch_size=1, remat="layer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matmul-efficiency", type=float, default=None)
    parser.add_argument("--memory-efficiency", type=float, default=None)
    parser.add_argument("--kernel-floor-s", type=float, default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help="row indices (0-9) to price; default all")
    parser.add_argument("--explain", type=int, nargs="*", default=[0, 5],
                        help="rows whose breakdown the report shows")
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("matmul_efficiency", args.matmul_efficiency),
                                   ("memory_efficiency", args.memory_efficiency),
                                   ("kernel_floor_s", args.kernel_floor_s)) if v is not None}
    rows = [MEGATRON_A100[i] for i in (args.rows or range(len(MEGATRON_A100)))]
    lines = ["| params (B) | t | p | d | GPUs | batch | published (s) | predicted (s) | "
             "predicted / published | predicted memory (GiB) | command |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:--|"]
    ratios, explained = [], []
    start = time.perf_counter()
    for row in rows:
        params, _, hidden, layers, t, p, gpus, batch, tflops = row
        measured = paper_flops(batch, layers, hidden) / (tflops * 1e12 * gpus)
        plan = predict(row, overrides)
        predicted = plan.extra.predicted_step_time_s
        ratios.append(predicted / measured)
        lines.append(f"| {params} | {t} | {p} | {gpus // (t * p)} | {gpus} | {batch} | "
                     f"{measured:.2f} | {predicted:.2f} | {predicted / measured:.2f} | "
                     f"{plan.extra.memory_per_device_bytes / 2**30:.1f} | `{command(row)}` |")
        print(lines[-1], flush=True)
        if MEGATRON_A100.index(row) in args.explain:
            explained.append((row, plan.extra.breakdown))
    errors = sorted(abs(r - 1) for r in ratios)
    summary = (f"Median error {100 * statistics.median(errors):.1f} %, worst "
               f"{100 * errors[-1]:.1f} %; predicted / published from {min(ratios):.2f} to "
               f"{max(ratios):.2f} over {len(ratios)} points "
               f"({time.perf_counter() - start:.0f} s to price them all).")
    text = "\n".join([f"Command: `python {' '.join(sys.argv)}`", "", *lines, "", summary])
    for row, breakdown in explained:
        text += (f"\n\nBreakdown of the {row[0]}B point (`--explain`):\n\n```\n"
                 f"{breakdown.format()}\n```")
    print("\n" + summary)
    if args.write:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, "gpu_calibration.md")
        with open(path, "w") as f:
            f.write(text + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
