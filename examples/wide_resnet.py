"""Automatic sharding of a Wide-ResNet train step (convolutions, BatchNorm, pooling).

Plans `wresnet-tiny` (a CIFAR-layout Wide-ResNet: depth 16, width x2, 16x16 images, SGD with
momentum) with ShardParallel on 8 devices, prints which way every convolution is split, runs
three steps and checks parameters and BatchNorm statistics against serial jax.jit. Runs on
8 simulated CPU devices:

    python examples/wide_resnet.py [--mesh 2 4] [--batch-size 32]
"""

import argparse
import collections
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite.intra_op.strategies import format_spec  # noqa: E402
from alpa_lite.models import build_workload, get_preset  # noqa: E402
from alpa_lite.testing import assert_trees_close  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    work = build_workload(get_preset("wresnet-tiny").with_overrides(batch_size=args.batch_size))
    state = work.state.replace(step=jnp.asarray(work.state.step, jnp.int32))  # no 2nd compile
    cfg = work.preset.config
    print(f"{work.preset.name}: depth {cfg.num_layers}, width x{cfg.width_factor}, "
          f"{cfg.image_size}x{cfg.image_size} images, batch {args.batch_size}, "
          f"{work.flops_per_step / 1e9:.2f} GFLOP per step")

    step = alpa_lite.parallelize(work.train_step,
                                 method=alpa_lite.ShardParallel(mesh_shape=tuple(args.mesh)))
    plan = step.plan(state, work.batch)
    s = plan.sharding
    print(f"mesh {s.mesh.shape}: planned in {plan.plan_time_s:.2f} s, predicted step "
          f"{plan.predicted_step_time_s * 1e3:.3f} ms, peak memory/device "
          f"{s.peak_memory_bytes / 2**20:.2f} MiB")
    print("replicated fallbacks:", ", ".join(s.fallback_primitives) or "none")
    convs = collections.Counter(
        (n.strategy, " ".join(format_spec(x) for x in n.in_specs))
        for n in s.nodes if n.primitive == "conv_general_dilated")
    print("convolution strategies (count, strategy, operand specs):")
    for (strategy, specs), count in convs.most_common():
        print(f"  {count:3d} x {strategy:<28} {specs}")

    serial = jax.jit(work.train_step)
    parallel_state, serial_state = state, state
    for i in range(3):
        start = time.perf_counter()
        parallel_state, loss = jax.block_until_ready(step(parallel_state, work.batch))
        elapsed = time.perf_counter() - start
        serial_state, serial_loss = serial(serial_state, work.batch)
        print(f"step {i}: loss {float(loss):.5f} (serial {float(serial_loss):.5f}), "
              f"{elapsed * 1e3:.0f} ms{' (includes compiling)' if i == 0 else ''}")
    assert_trees_close(parallel_state.params, serial_state.params, rtol=1e-4, atol=1e-5)
    assert_trees_close(parallel_state.batch_stats, serial_state.batch_stats, rtol=1e-4,
                       atol=1e-5)
    print("OK: parameters and BatchNorm statistics equal serial jax.jit after 3 steps")


if __name__ == "__main__":
    main()
