"""Which parallelization method is fastest for a tiny GPT on this machine's devices?

Runs data parallel, ZeRO-2/3, the best of a few Megatron-style (dp, tp, pp) layouts, automatic
sharding and the automatic pipeline on the same train step; times them round-robin (one step
of each per round, so load from other processes hits all alike), checks each against serial
jax.jit, prints a table and, on the last line, a verdict. On 8 simulated CPU devices:

    python examples/compare_methods.py           # about 3-4 minutes on 2 cores
    python examples/compare_methods.py --quick   # 2 methods, smaller model (for tests)
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import alpa_lite as al  # noqa: E402
from alpa_lite.models import build_workload, get_preset  # noqa: E402


def methods(quick: bool) -> dict:
    if quick:
        return {"DataParallel": al.DataParallel(), "ShardParallel (auto)": al.ShardParallel()}
    pipe = dict(num_micro_batches=4, layer_option=al.AutoLayerOption(layer_num=4))
    uniform = al.ManualStageOption(forward_stage_layer_ids=((0, 1), (2, 3)),
                                   submesh_shapes=((1, 4), (1, 4)),
                                   logical_mesh_shapes=((2, 2), (2, 2)))
    return {"DataParallel": al.DataParallel(), "Zero2Parallel": al.Zero2Parallel(),
            "Zero3Parallel": al.Zero3Parallel(),
            "Megatron dp=4 tp=2": al.ShardParallel(mesh_shape=(4, 2)),
            "Megatron dp=2 tp=4": al.ShardParallel(mesh_shape=(2, 4)),
            "Megatron dp=2 tp=2 pp=2": al.PipeshardParallel(stage_option=uniform, **pipe),
            "ShardParallel (auto)": al.ShardParallel(),
            "PipeshardParallel (auto)": al.PipeshardParallel(stage_option="auto", **pipe)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    layers, batch = (2, 16) if args.quick else (4, 32)
    repeats = args.repeats or (3 if args.quick else 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-3))
    work = build_workload(get_preset("gpt-tiny").with_overrides(num_layers=layers,
                                                                batch_size=batch),
                          optimizer=optimizer)
    state0 = work.state.replace(step=jnp.asarray(work.state.step, jnp.int32))  # one compile
    print(f"gpt-tiny, {layers} layers, batch {batch}, on {len(jax.devices())} "
          f"{jax.devices()[0].platform} devices ({os.cpu_count()} CPU cores)")

    runs = {"serial jax.jit": {"fn": jax.jit(work.train_step), "plan_s": 0.0}}
    for name, method in methods(args.quick).items():
        fn = al.parallelize(work.train_step, method=method)
        start = time.perf_counter()
        fn.plan(state0, work.batch)
        runs[name] = {"fn": fn, "plan_s": time.perf_counter() - start}
    for name, run in runs.items():  # compile and warm up (2 steps)
        start = time.perf_counter()
        run["state"], _ = jax.block_until_ready(run["fn"](state0, work.batch))
        run["compile_s"] = time.perf_counter() - start
        run["state"], _ = jax.block_until_ready(run["fn"](run["state"], work.batch))
        run["times"] = []
        print(f"  {name}: plan {run['plan_s']:.1f} s, compile {run['compile_s']:.1f} s",
              flush=True)
    for _ in range(repeats):  # round-robin timing
        for run in runs.values():
            start = time.perf_counter()
            run["state"], run["loss"] = jax.block_until_ready(run["fn"](run["state"],
                                                                       work.batch))
            run["times"].append(time.perf_counter() - start)

    ref = runs["serial jax.jit"]
    print(f"\n{'method':<26} {'step (ms)':>10} {'samples/s':>10} {'vs DP':>7} "
          f"{'plan (s)':>9} {'compile (s)':>12}  matches serial")
    dp_step = statistics.median(runs["DataParallel"]["times"])
    for name, run in runs.items():
        run["step"] = statistics.median(run["times"])
        run["ok"] = all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(
            jax.tree_util.tree_leaves((run["state"].params, run["loss"])),
            jax.tree_util.tree_leaves((ref["state"].params, ref["loss"]))))
        print(f"{name:<26} {run['step'] * 1e3:>10.1f} {batch / run['step']:>10.0f} "
              f"{dp_step / run['step']:>6.2f}x {run['plan_s']:>9.1f} {run['compile_s']:>12.1f}  "
              f"{'yes' if run['ok'] else 'NO'}")

    ranked = sorted((run["step"], name) for name, run in runs.items()
                    if name != "serial jax.jit" and run["ok"])
    (best, winner), (second, runner_up) = ranked[0], (ranked + [(float("nan"), "none")])[1]
    print(f"\nStep times are medians of {repeats} steps; simulated CPU devices share "
          f"{os.cpu_count()} cores, so this ranks dispatch and collective overheads, not GPUs.")
    vs_dp = ("" if "DataParallel" in (winner, runner_up)
             else f"; {dp_step / best:.2f}x faster than DataParallel")
    noise = " (within run-to-run noise here)" if second / best < 1.05 else ""
    print(f"Verdict: {winner} won at {batch / best:.0f} samples/s ({best * 1e3:.1f} ms/step), "
          f"{second / best:.2f}x faster than the runner-up {runner_up}{noise}{vs_dp}; "
          f"serial jax.jit on 1 device: {ref['step'] * 1e3:.1f} ms/step")


if __name__ == "__main__":
    main()
