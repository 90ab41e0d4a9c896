"""Per-call overhead: alpa_lite's step against the same step written by hand, in one run.

A 2-layer GPT (hidden 64, batch 16, SGD with momentum) is called with a fresh host batch every
step, the state carried from step to step, on 8 simulated CPU devices. For each method the
reference is what a user would write by hand:

* ShardParallel-family methods: ``jax.jit(train_step, in_shardings=..., out_shardings=...)``
  with the plan's shardings (for mesh (1,): plain ``jax.jit`` on one device);
* the pipeline: a straight-line Python function calling the very same jitted stage programs
  and transfers in the same order (generated from the executable's instruction list), i.e.
  "its launch count x a bare jitted call", without alpa_lite's driver and argument checks.

Timing: ``--rounds`` rounds; in each, every variant runs ``--steps`` steps (each followed by
``jax.block_until_ready``) and the median step is kept; variants alternate within a round so
that load from other processes hits both alike. The ratio column is the median over rounds of
alpa_lite / reference. "dispatch/launch" is, for the pipeline, the time until the call
returns (dispatch is asynchronous) divided by the launches per step. A last line isolates the
wrapper: a tiny program called through alpa_lite and directly, without blocking.

Run:

    python benchmarks/bench_overhead.py            # writes docs/benchmarks/overhead.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import timeit

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite.models import build_workload, get_preset  # noqa: E402
from alpa_lite.models.train import make_batch  # noqa: E402


def build(batch_size: int):
    preset = get_preset("gpt-tiny").with_overrides(num_layers=2, batch_size=batch_size)
    work = build_workload(preset, optimizer=optax.sgd(0.01, momentum=0.9))
    batches = [jax.tree_util.tree_map(np.asarray, make_batch(preset, batch_size, seed))
               for seed in range(8)]
    return work, batches


def shard_reference(executable, train_step):
    """The hand-written jax.jit with the plan's in/out shardings."""
    out_tree = executable.traced.out_tree
    return jax.jit(train_step, in_shardings=executable.input_shardings,
                   out_shardings=jax.tree_util.tree_unflatten(out_tree,
                                                              executable.out_shardings))


def pipeline_reference(executable):
    """Straight-line Python calling the executable's programs, as one would by hand."""
    instructions = executable.instructions
    lines = ["def step(fns, regs):"]
    for i, ins in enumerate(instructions):
        args = ", ".join(f"r{s}" if s not in _inputs(executable) else f"regs[{s}]"
                         for s in ins.reads)
        outs = "".join(f"r{s}, " for s in ins.writes)
        lines.append(f"    ({outs}) = fns[{i}]({args})" if ins.writes else
                     f"    fns[{i}]({args})")
    outputs = ", ".join(f"r{s}" if s is not None and s not in _inputs(executable)
                        else (f"regs[{s}]" if s is not None else "None")
                        for s, _ in executable._outputs)
    lines.append(f"    return ({outputs},)")
    namespace: dict = {}
    exec("\n".join(lines), namespace)  # noqa: S102 - generated from our own instruction list
    fns = [ins.fn for ins in instructions]
    step = namespace["step"]
    initial = list(executable._initial)

    def run(state, batch):
        leaves = jax.tree_util.tree_leaves((state, batch))
        regs = list(initial)
        placed = jax.device_put([leaves[p] for p, _, s in executable._inputs],
                                [s for _, _, s in executable._inputs])
        for (_, slot, _), value in zip(executable._inputs, placed):
            regs[slot] = value
        outs = step(fns, regs)
        return jax.tree_util.tree_unflatten(executable.traced.out_tree, list(outs))

    return run


def _inputs(executable) -> set[int]:
    return {slot for _, slot, _ in executable._inputs}


def time_variant(fn, state, batches, steps: int) -> tuple[float, float, object]:
    """Median step and median dispatch time over ``steps`` steps; returns the last state."""
    totals, dispatches = [], []
    for i in range(steps):
        start = time.perf_counter()
        out = fn(state, batches[i % len(batches)])
        dispatches.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        totals.append(time.perf_counter() - start)
        state = out[0]
    return statistics.median(totals), statistics.median(dispatches), state


def measure(name, method, work, batches, args) -> dict:
    step = alpa_lite.parallelize(work.train_step, method=method)
    state = work.state
    executable = step.get_executable(state, batches[0])
    if isinstance(method, alpa_lite.PipeshardParallel):
        reference = pipeline_reference(executable)
        launches = len(executable.instructions)
    else:
        reference = shard_reference(executable, work.train_step)
        launches = 1
    states = {"alpa_lite": state, "reference": state}
    for variant, fn in (("alpa_lite", step), ("reference", reference)):  # compile, warm up
        states[variant] = time_variant(fn, states[variant], batches, 2)[2]
    ratios, medians = [], {"alpa_lite": [], "reference": []}
    dispatch = []
    for _ in range(args.rounds):
        for variant, fn in (("alpa_lite", step), ("reference", reference)):
            median, disp, states[variant] = time_variant(fn, states[variant], batches, args.steps)
            medians[variant].append(median)
            if variant == "alpa_lite":
                dispatch.append(disp)
        ratios.append(medians["alpa_lite"][-1] / medians["reference"][-1])
    return {"name": name, "alpa_s": statistics.median(medians["alpa_lite"]),
            "reference_s": statistics.median(medians["reference"]),
            "ratio": statistics.median(ratios), "launches": launches,
            "dispatch_per_launch_s": statistics.median(dispatch) / launches,
            "num_plans": step.num_plans}


def measure_wrapper_us(repeats: int = 5, number: int = 2000) -> tuple[float, float]:
    """Per-call cost of a parallelized call and of the same jitted program called directly.

    A tiny program on one device, inputs already placed, no blocking: the difference is
    alpa_lite's Python wrapper alone, free of the step-time noise above.
    """
    import jax.numpy as jnp

    w, x = jnp.ones((8, 8)), jnp.ones((4, 8))
    step = alpa_lite.parallelize(lambda w, x: jnp.tanh(x @ w),
                                 method=alpa_lite.ShardParallel(mesh_shape=(1,)))
    executable = step.get_executable(w, x)
    w, x = executable.place((w, x))
    jitted = executable._jitted
    wrapped = min(timeit.repeat(lambda: step(w, x), number=number, repeat=repeats)) / number
    direct = min(timeit.repeat(lambda: jitted(w, x), number=number, repeat=repeats)) / number
    return wrapped * 1e6, direct * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="docs/benchmarks/overhead.md")
    args = parser.parse_args()
    work, batches = build(args.batch_size)
    methods = [
        ("DataParallel (8,)", alpa_lite.DataParallel(mesh_shape=(8,))),
        ("Zero3Parallel (8,)", alpa_lite.Zero3Parallel(mesh_shape=(8,))),
        ("ShardParallel (1,) vs plain jax.jit", alpa_lite.ShardParallel(mesh_shape=(1,))),
        ("ShardParallel (8,)", alpa_lite.ShardParallel(mesh_shape=(8,))),
        ("ShardParallel (2, 4)", alpa_lite.ShardParallel(mesh_shape=(2, 4))),
        ("PipeshardParallel 2 stages x 4 devices, 4 micro-batches",
         alpa_lite.PipeshardParallel(num_micro_batches=4,
                                     layer_option=alpa_lite.AutoLayerOption(layer_num=2),
                                     stage_option=alpa_lite.UniformStageOption(num_stages=2))),
    ]
    header = [f"Command: `python {' '.join(sys.argv)}`  ",
              f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
              f"{len(jax.devices())} simulated {jax.devices()[0].platform} devices; gpt-tiny "
              f"2 layers, hidden 64, batch {args.batch_size}, SGD momentum; median of "
              f"{args.steps} steps, {args.rounds} interleaved rounds\n",
              "| method | alpa_lite step (ms) | hand-written (ms) | ratio | launches/step "
              "| dispatch/launch (us) | plans |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(header), flush=True)
    rows = []
    for name, method in methods:
        r = measure(name, method, work, batches, args)
        row = (f"| {r['name']} | {r['alpa_s'] * 1e3:.2f} | {r['reference_s'] * 1e3:.2f} | "
               f"{r['ratio']:.3f} | {r['launches']} | {r['dispatch_per_launch_s'] * 1e6:.0f} "
               f"| {r['num_plans']} |")
        rows.append(row)
        print(row, flush=True)
    wrapped_us, direct_us = measure_wrapper_us()
    rows.append(f"\nWrapper cost per call (tiny 1-device program, placed inputs, best of 5 x 2000 "
                f"calls): parallelized {wrapped_us:.2f} us, the same jitted program called "
                f"directly {direct_us:.2f} us, difference {wrapped_us - direct_us:.2f} us.")
    print(rows[-1], flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
