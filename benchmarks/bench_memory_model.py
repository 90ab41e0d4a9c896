"""Memory-model accuracy: the planner's predicted peak per-device memory vs XLA's.

For gpt-tiny at the cost-model bench's size (4 layers, hidden 64, batch 32) and a wider one
(2 layers, hidden 256, batch 16), AdamW + global-norm clipping, 8 devices: the plan's
``peak_memory_bytes`` against argument + output + temp - alias bytes of
``compiled.memory_analysis()`` of the same SPMD program. Run:

    python benchmarks/bench_memory_model.py
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite.models import build_workload  # noqa: E402
from alpa_lite.models.presets import get_preset  # noqa: E402

SIZES = ((4, 64, 32), (2, 256, 16))  # (layers, hidden, batch)
METHODS = (
    ("DataParallel (8,)", alpa_lite.DataParallel),
    ("Zero2Parallel (8,)", alpa_lite.Zero2Parallel),
    ("Zero3Parallel (8,)", alpa_lite.Zero3Parallel),
    ("ShardParallel (8,)", alpa_lite.ShardParallel),
    ("ShardParallel (2, 4)", lambda: alpa_lite.ShardParallel(mesh_shape=(2, 4))),
    ("ShardParallel (4, 2)", lambda: alpa_lite.ShardParallel(mesh_shape=(4, 2))),
)


def build(layers: int, hidden: int, batch: int):
    preset = get_preset("gpt-tiny").with_overrides(num_layers=layers, batch_size=batch)
    preset = dataclasses.replace(preset, config=dataclasses.replace(preset.config,
                                                                    hidden_size=hidden))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-3))
    work = build_workload(preset, optimizer=optimizer)
    return work._replace(state=work.state.replace(step=jnp.asarray(work.state.step, jnp.int32)))


def main() -> None:
    print("| model | method | predicted (MiB) | XLA (MiB) | error % | XLA arg / out / temp (MiB) |")
    print("|:--|:--|--:|--:|--:|:--|")
    for layers, hidden, batch in SIZES:
        work = build(layers, hidden, batch)
        for name, make in METHODS:
            p = alpa_lite.parallelize(work.train_step, method=make())
            predicted = p.plan(work.state, work.batch).peak_memory_bytes
            stats = p.lower(work.state, work.batch).compile().memory_analysis()
            parts = (stats.argument_size_in_bytes, stats.output_size_in_bytes,
                     stats.temp_size_in_bytes)
            xla = sum(parts) - stats.alias_size_in_bytes  # = testing.xla_footprint_bytes
            print(f"| L{layers} h{hidden} b{batch} | {name} | {predicted / 2**20:.2f} | "
                  f"{xla / 2**20:.2f} | {(predicted - xla) / xla * 100:+.0f} | "
                  f"{' / '.join(f'{b / 2**20:.2f}' for b in parts)} |", flush=True)


if __name__ == "__main__":
    main()
