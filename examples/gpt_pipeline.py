"""Pipelining a GPT train step (Alpa's PipeshardParallel): layers, stages, timeline.

The step is cut into layers automatically, Alpa's stage DP groups them into stages on
submeshes (each stage gets its own intra-op plan), and a 1F1B schedule runs the micro-batches.
Prints the plan, writes the predicted and the measured timeline as PNGs and checks three
steps against serial jax.jit. Runs on 8 simulated CPU devices:

    python examples/gpt_pipeline.py [--stages auto|uniform] [--out-dir /tmp]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite.models import build_workload, get_preset  # noqa: E402
from alpa_lite.testing import assert_trees_close  # noqa: E402
from alpa_lite.timeline import write_measured_timeline, write_plan_timeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="GPT blocks (= pipeline layers)")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--stages", choices=["auto", "uniform"], default="auto")
    parser.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    parser.add_argument("--out-dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    preset = get_preset("gpt-tiny").with_overrides(num_layers=args.layers, batch_size=32)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-3))
    work = build_workload(preset, optimizer=optimizer)
    state = work.state.replace(step=jnp.asarray(work.state.step, jnp.int32))  # no 2nd compile

    method = alpa_lite.PipeshardParallel(
        num_micro_batches=args.micro_batches,
        layer_option=alpa_lite.AutoLayerOption(layer_num=args.layers),
        stage_option=args.stages, schedule=args.schedule)
    step = alpa_lite.parallelize(work.train_step, method=method)
    plan = step.plan(state, work.batch)
    print(plan.summary())
    for s in plan.stages:
        print(f"stage {s['stage']}: layers {s['layers']} on submesh {tuple(s['submesh'])} "
              f"viewed as {tuple(s['logical_mesh'])}")

    os.makedirs(args.out_dir, exist_ok=True)
    predicted_png = write_plan_timeline(plan, os.path.join(args.out_dir,
                                                           "gpt_pipeline_predicted.png"))
    print(f"predicted timeline: {predicted_png}")

    serial = jax.jit(work.train_step)
    parallel_state, serial_state = state, state
    for i in range(3):
        start = time.perf_counter()
        parallel_state, loss = jax.block_until_ready(step(parallel_state, work.batch))
        elapsed = time.perf_counter() - start
        serial_state, serial_loss = serial(serial_state, work.batch)
        print(f"step {i}: loss {float(loss):.6f} (serial {float(serial_loss):.6f}), "
              f"{elapsed * 1e3:.0f} ms{' (includes compiling)' if i == 0 else ''}")

    assert_trees_close(parallel_state.params, serial_state.params, rtol=1e-4, atol=1e-5)
    print(f"OK: {len(plan.stages)}-stage pipeline equals serial jax.jit after 3 steps "
          "(rtol 1e-4)")

    executable = step.get_executable(state, work.batch)
    measured_png = write_measured_timeline(executable, (parallel_state, work.batch),
                                           os.path.join(args.out_dir, "gpt_pipeline_measured.png"))
    print(f"measured timeline (blocking after each program): {measured_png}")


if __name__ == "__main__":
    main()
