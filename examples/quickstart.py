"""alpa_lite in one page: plan, run and check a parallel GPT train step on 8 devices.

Run with simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/quickstart.py
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite.models.presets import get_preset  # noqa: E402
from alpa_lite.models.train import build_workload  # noqa: E402
from alpa_lite.testing import assert_trees_close  # noqa: E402


def main() -> None:
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}")
    work = build_workload(get_preset("gpt-tiny").with_overrides(num_layers=2, batch_size=16))
    method = alpa_lite.ShardParallel(mesh_shape=(2, 4))
    step = alpa_lite.parallelize(work.train_step, method=method, donate_argnums=())

    plan = step.plan(work.state, work.batch)
    print(plan.summary(max_rows=12))

    state, serial_state = work.state, work.state
    serial_step = jax.jit(work.train_step)
    for i in range(3):
        state, loss = step(state, work.batch)
        serial_state, serial_loss = serial_step(serial_state, work.batch)
        print(f"step {i}: loss {float(loss):.6f} (serial jax.jit {float(serial_loss):.6f})")

    report("ShardParallel (2, 4)", state, serial_state)

    # The same step, pipelined: 2 stages of 4 devices each, 4 micro-batches, 1F1B.
    pipelined = alpa_lite.parallelize(work.train_step, method=alpa_lite.PipeshardParallel(
        num_micro_batches=4, layer_option=alpa_lite.AutoLayerOption(layer_num=2),
        stage_option=alpa_lite.UniformStageOption(num_stages=2), schedule="1f1b"))
    print(pipelined.plan(work.state, work.batch).summary())
    state = work.state
    for i in range(3):
        state, loss = pipelined(state, work.batch)
        print(f"pipelined step {i}: loss {float(loss):.6f}")
    report("PipeshardParallel 2 stages x 4 devices", state, serial_state)


def report(name: str, state, serial_state) -> None:
    # AdamW divides by sqrt(v): for a gradient entry near zero, the last-bit differences of a
    # parallel sum (a different summation order) grow to ~1e-5 relative after a few steps.
    try:
        assert_trees_close(state.params, serial_state.params, rtol=1e-4, atol=1e-5)
        print(f"RESULT {name}: parameters equal serial jax.jit after 3 steps (rtol 1e-4)")
    except AssertionError as err:
        print(f"RESULT {name}: parallel and serial results DIFFER:\n{err}")
        raise SystemExit(1) from err


if __name__ == "__main__":
    main()
