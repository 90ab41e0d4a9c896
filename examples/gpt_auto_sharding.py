"""Automatic intra-operator sharding of a GPT train step (Alpa's ShardParallel).

The ILP picks a sharding for every operator of the step on a (2, 4) device mesh; the example
prints the plan, the collectives XLA emitted for it, runs three steps and checks them against
serial jax.jit. Runs on 8 simulated CPU devices:

    python examples/gpt_auto_sharding.py [--mesh 2 4] [--layers 2] [--batch-size 16]
"""

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite.models import build_workload, get_preset  # noqa: E402
from alpa_lite.testing import assert_trees_close, count_collectives  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    preset = get_preset("gpt-tiny").with_overrides(num_layers=args.layers,
                                                   batch_size=args.batch_size)
    # eps=1e-3: Adam's 1/sqrt(v) would otherwise amplify last-bit summation-order differences.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-3))
    work = build_workload(preset, optimizer=optimizer)
    # A strongly typed step counter: otherwise the second call compiles again (weak int32).
    state = work.state.replace(step=jnp.asarray(work.state.step, jnp.int32))
    print(f"{len(jax.devices())} {jax.devices()[0].platform} devices; {preset.name} with "
          f"{args.layers} layers, batch {args.batch_size}")

    method = alpa_lite.ShardParallel(mesh_shape=tuple(args.mesh))
    step = alpa_lite.parallelize(work.train_step, method=method)
    start = time.perf_counter()
    plan = step.plan(state, work.batch)
    print(f"planned in {time.perf_counter() - start:.2f} s; predicted step time "
          f"{plan.predicted_step_time_s * 1e3:.3f} ms (default CPU link model)\n")
    print(plan.summary(max_rows=10))

    hlo = step.lower(state, work.batch).compile().as_text()
    print("\ncollectives in the compiled program:",
          count_collectives(hlo, min_elements=2) or "none")

    serial = jax.jit(work.train_step)
    parallel_state, serial_state = state, state
    for i in range(3):
        start = time.perf_counter()
        parallel_state, loss = jax.block_until_ready(step(parallel_state, work.batch))
        elapsed = time.perf_counter() - start
        serial_state, serial_loss = serial(serial_state, work.batch)
        print(f"step {i}: loss {float(loss):.6f} (serial {float(serial_loss):.6f}), "
              f"{elapsed * 1e3:.1f} ms")
    assert_trees_close(parallel_state.params, serial_state.params, rtol=1e-4, atol=1e-5)
    assert_trees_close(parallel_state.opt_state, serial_state.opt_state, rtol=1e-4, atol=1e-5)
    print(f"OK: ShardParallel{tuple(args.mesh)} equals serial jax.jit after 3 steps "
          "(params and optimizer state, rtol 1e-4)")


if __name__ == "__main__":
    main()
