"""Training throughput of every parallelization method on one model, on the local devices.

For a tiny GPT (default) or Wide-ResNet, runs on 8 (simulated CPU) devices:

* DataParallel, Zero2Parallel, Zero3Parallel;
* the best Megatron-style manual plan of a small (dp, tp, pp) grid: pp = 1 is
  ``ShardParallel(mesh_shape=(dp, tp))``, pp > 1 is ``PipeshardParallel`` with uniform
  ``ManualStageOption`` stages, each on a (dp, tp) logical mesh; the fastest measured wins;
* ShardParallel (automatic sharding on all devices as one axis, and on a (2, 4) mesh);
* PipeshardParallel with automatic layers and ``stage_option="auto"`` (Alpa's stage DP).

Per method: plan (search) time, compile time (the first call after planning: compile plus one
step), step time (median of ``--repeats`` steps after ``--warmup`` steps, each followed by
``jax.block_until_ready``; the state is carried from step to step as in training, and the
methods are timed round-robin, one step each per round, so that load from other processes hits
all of them alike), samples/s, model TFLOP/s per device (`model_flops_per_step`), peak memory
per device (XLA's ``memory_analysis()`` of the compiled SPMD program; "n/a" for pipelines,
which run many programs), the planner's predicted step time and memory (default link model of
the platform: alpha 5 us, 10 GB/s, 50 GFLOP/s on CPU), and whether the state after all steps
equals serial ``jax.jit`` run for as many steps (rtol 1e-4, atol 1e-5; with half-precision
compute, ``--dtype``, at most 1% of the elements beyond rtol 1e-2, atol 1e-3; for a BatchNorm model
a pipeline normalises per micro-batch, and is then also checked against a serial micro-batched
step).

Run:

    python benchmarks/bench_throughput.py                       # gpt-tiny, 4 layers, batch 32
    python benchmarks/bench_throughput.py --model wresnet-tiny
    python benchmarks/bench_throughput.py --dtype bfloat16      # the default on GPU / TPU

Writes ``docs/benchmarks/throughput_<family>.md`` and ``.png`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import alpa_lite  # noqa: E402
from alpa_lite.models import build_workload, get_preset  # noqa: E402
from alpa_lite.testing import xla_footprint_bytes  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
# Half-precision compute rounds every partial sum to 8 (bf16) or 11 (fp16) mantissa bits, so
# another summation order moves results by ~1e-3 relative; and Adam's 1/sqrt(v) flips the
# update of elements whose gradient is near zero. There the check is: at most 1% of the
# elements differ by more than rtol 1e-2 / atol 1e-3.
HALF_RTOL, HALF_ATOL, HALF_FRACTION = 1e-2, 1e-3, 0.01


# --- workload ------------------------------------------------------------------------------


def build(args):
    """The workload of ``args.model`` with the layer / batch overrides of the command line."""
    preset = get_preset(args.model).with_overrides(
        num_layers=args.layers, batch_size=args.batch_size,
        dtype=None if args.dtype == "float32" else args.dtype)
    dims = {field: getattr(args, name, None) for name, field in (
        ("hidden", "hidden_size"), ("heads", "num_heads"), ("vocab", "vocab_size"),
        ("seq_len", "seq_len"))}
    dims = {field: value for field, value in dims.items() if value}
    if dims:
        if preset.family == "wresnet":
            raise SystemExit("--hidden/--heads/--vocab/--seq-len apply to GPT / LLaMA only")
        preset = dataclasses.replace(preset, config=dataclasses.replace(preset.config, **dims))
    optimizer = None
    if preset.family != "wresnet":
        # AdamW + global-norm clipping as in GPT training; eps=1e-3 so Adam's 1/sqrt(v) does not
        # blow last-bit summation-order differences up (as tests/end_to_end does).
        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-3))
    work = build_workload(preset, optimizer=optimizer)
    # TrainState.create leaves `step` a weak-typed int32; after one step it is strongly typed,
    # so the second call of any jitted step would trace and compile again. Make it strong now.
    return work._replace(state=work.state.replace(step=jnp.asarray(work.state.step, jnp.int32)))


# --- one method ----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    name: str
    config: str
    plan_s: float = math.nan
    compile_s: float = math.nan
    step_s: float = math.nan
    predicted_s: float = math.nan
    predicted_mem: float = math.nan
    measured_mem: float | None = None
    matches: str = "n/a"
    error: str = ""
    kind: str = ""          # "serial", "shard" or "pipeline"
    stages: str = ""


def _max_diff(actual, expected) -> float:
    diffs = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))))
             for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected))]
    return max(diffs) if diffs else 0.0


def compare(state, loss, ref_state, ref_loss, half: bool = False) -> tuple[bool, float]:
    """(close, max abs difference) of params (+ BatchNorm stats) and loss: all elements at
    RTOL/ATOL, or with half-precision compute all but HALF_FRACTION at HALF_RTOL/HALF_ATOL."""
    fields = ["params"] + (["batch_stats"] if hasattr(state, "batch_stats") else [])
    pairs = [(getattr(state, f), getattr(ref_state, f)) for f in fields] + [(loss, ref_loss)]
    rtol, atol, allowed = (HALF_RTOL, HALF_ATOL, HALF_FRACTION) if half else (RTOL, ATOL, 0.0)
    leaves = [(np.asarray(a, np.float64), np.asarray(e, np.float64)) for x, y in pairs
              for a, e in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y))]
    far = sum(int(np.sum(~np.isclose(a, e, rtol=rtol, atol=atol))) for a, e in leaves)
    total = sum(a.size for a, _ in leaves)
    return far <= allowed * total, max(_max_diff(x, y) for x, y in pairs)


def microbatched_serial_step(work, k: int):
    """Serial reference for a BatchNorm model pipelined over ``k`` micro-batches.

    A pipeline normalises each micro-batch with its own statistics, so it cannot equal the
    full-batch step. This step does what it should be equal to, on one device: micro-batch
    ``i`` takes examples ``i, i+k, ...``, gradients and losses are averaged over micro-batches,
    and the new BatchNorm statistics are the mean of the micro-batches' (SGD as in the zoo).
    """
    model = work.model

    def loss_fn(params, stats, batch):
        out, updates = model.apply({"params": params, "batch_stats": stats}, batch["images"],
                                   train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(
            out.astype(jnp.float32), batch["labels"]).mean()
        return loss, updates["batch_stats"]

    def step(state, batch):
        results = [jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, jax.tree_util.tree_map(lambda x: x[i::k], batch))
            for i in range(k)]
        mean = lambda *xs: sum(xs) / k  # noqa: E731
        loss = mean(*(loss for (loss, _), _ in results))
        stats = jax.tree_util.tree_map(mean, *(stats for (_, stats), _ in results))
        grads = jax.tree_util.tree_map(mean, *(grads for _, grads in results))
        return state.apply_gradients(grads=grads).replace(batch_stats=stats), loss

    return jax.jit(step)


class Runner:
    """One method: `prepare` plans, compiles and warms up; `step` runs one timed step;
    `finish` checks the result against serial jax.jit and reads the memory statistics.

    Errors become the row's ``error`` (the benchmark goes on with the other methods)."""

    def __init__(self, name: str, config: str, method, work, args):
        self.work, self.args, self.method = work, args, method
        self.result = Result(name, config, kind="serial" if method is None else (
            "pipeline" if isinstance(method, alpa_lite.PipeshardParallel) else "shard"))
        self.times: list[float] = []
        self.state = self.loss = self.first = None

    def prepare(self) -> None:
        r, work = self.result, self.work
        print(f"  {r.name} {r.config} ...", end="", flush=True)
        try:
            if self.method is None:
                self.fn = jax.jit(work.train_step)
            else:
                self.fn = alpa_lite.parallelize(work.train_step, method=self.method,
                                                cluster=getattr(self.args, "cluster", None))
                start = time.perf_counter()
                plan = self.fn.plan(work.state, work.batch)
                r.plan_s = time.perf_counter() - start
                r.predicted_s = plan.predicted_step_time_s
                if plan.sharding is not None:
                    r.predicted_mem = plan.sharding.peak_memory_bytes
                else:
                    r.predicted_mem = max(s.peak_memory_bytes for s in plan.stages)
                    r.stages = " | ".join(
                        f"layers {','.join(map(str, s.layers))} on {s.submesh} "
                        f"as {s.logical_mesh}" for s in plan.stages)
            start = time.perf_counter()
            self.state, self.loss = jax.block_until_ready(self.fn(work.state, work.batch))
            r.compile_s = time.perf_counter() - start
            self.first = (self.state, self.loss)  # one step from the initial state
            for _ in range(self.args.warmup - 1):
                self.state, self.loss = jax.block_until_ready(self.fn(self.state, work.batch))
            print(f" plan {_fmt(r.plan_s, '.1f')} s, compile {r.compile_s:.1f} s", flush=True)
        except Exception as err:  # noqa: BLE001 - a failing method is reported in its row
            self._fail(err)

    def step(self) -> None:
        if self.result.error:
            return
        try:
            start = time.perf_counter()
            self.state, self.loss = jax.block_until_ready(self.fn(self.state, self.work.batch))
            self.times.append(time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def finish(self, reference) -> Result:
        r = self.result
        if r.error:
            return r
        r.step_s = statistics.median(self.times)
        r.matches = "(reference)"
        try:
            if reference is not None:
                r.matches = self._check(reference)
            if r.kind != "pipeline" and self.args.memory:
                r.measured_mem = xla_footprint_bytes(
                    self.fn.lower(self.state, self.work.batch).compile())
        except Exception as err:  # noqa: BLE001
            self._fail(err)
        return r

    def _check(self, reference) -> str:
        """After one step (from the same initial state) and after all steps."""
        steps = self.args.warmup + len(self.times)
        half = self.args.dtype != "float32"
        first_ok, first_diff = compare(*self.first, *reference.first, half)
        last_ok, last_diff = compare(self.state, self.loss, reference.state, reference.loss,
                                     half)
        if first_ok:
            return "yes" if last_ok else (f"yes after 1 step; after {steps}: max abs diff "
                                          f"{last_diff:.1e}")
        if self.result.kind == "pipeline" and hasattr(self.state, "batch_stats"):
            # BatchNorm normalises each micro-batch on its own: compare with that, serially.
            ref_step = microbatched_serial_step(self.work, self.method.num_micro_batches)
            ok, diff = compare(*self.first, *ref_step(self.work.state, self.work.batch), half)
            if ok:
                return ("not the full-batch step (BatchNorm per micro-batch); yes vs "
                        "micro-batched serial")
        return f"NO: max abs diff {first_diff:.1e} after 1 step"

    def _fail(self, err: Exception) -> None:
        traceback.print_exc()
        self.result.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def run_runners(runners: list[Runner], args) -> list[Result]:
    """Prepares every runner, then times them round-robin (one step of each per round, so that
    load from other processes hits every method alike), then checks them against the first
    (the serial reference)."""
    for runner in runners:
        runner.prepare()
    print(f"  timing {args.repeats} rounds, round-robin ...", flush=True)
    for _ in range(args.repeats):
        for runner in runners:
            runner.step()
    reference = runners[0]
    return [reference.finish(None)] + [r.finish(reference) for r in runners[1:]]


# --- methods -------------------------------------------------------------------------------


def pipeline(args, stage_option):
    return alpa_lite.PipeshardParallel(
        num_micro_batches=args.micro_batches,
        layer_option=alpa_lite.AutoLayerOption(layer_num=args.pipeline_layers),
        stage_option=stage_option)


def megatron_grid(args, num_devices: int):
    """(label, method) per (dp, tp, pp): tp*dp*pp = devices, pp divides the pipeline layers."""
    grid = []
    for pp in args.pp:
        if num_devices % pp or args.pipeline_layers % pp:
            continue
        per_stage = num_devices // pp
        for tp in (t for t in (1, 2, 4, 8) if per_stage % t == 0):
            dp = per_stage // tp
            if args.grid == "small" and pp == 1 and tp == 1:
                continue  # (8, 1) is data parallel's mesh; measured as DataParallel
            label = f"dp={dp} tp={tp} pp={pp}"
            if pp == 1:
                grid.append((label, alpa_lite.ShardParallel(mesh_shape=(dp, tp))))
                continue
            per = args.pipeline_layers // pp
            stages = alpa_lite.ManualStageOption(
                forward_stage_layer_ids=tuple(tuple(range(s * per, (s + 1) * per))
                                              for s in range(pp)),
                submesh_shapes=((1, per_stage),) * pp,
                logical_mesh_shapes=((dp, tp),) * pp)
            grid.append((label, pipeline(args, stages)))
    return grid


def run_all(work, args):
    """Returns (serial row, method rows, megatron grid rows)."""
    n = len(jax.devices())
    runners = [Runner("serial jax.jit", "1 device", None, work, args)]
    wanted = set(args.methods)
    if "dp" in wanted:
        runners.append(Runner("DataParallel", f"({n},)", alpa_lite.DataParallel(), work, args))
    if "zero2" in wanted:
        runners.append(Runner("Zero2Parallel", f"({n},)", alpa_lite.Zero2Parallel(), work, args))
    if "zero3" in wanted:
        runners.append(Runner("Zero3Parallel", f"({n},)", alpa_lite.Zero3Parallel(), work, args))
    grid = [Runner("Megatron-style", label, method, work, args)
            for label, method in megatron_grid(args, n)] if "megatron" in wanted else []
    runners += grid
    if "shard" in wanted:
        runners.append(Runner("ShardParallel (auto)", f"({n},)", alpa_lite.ShardParallel(), work,
                              args))
        runners.append(Runner("ShardParallel (auto)", "(2, 4)",
                              alpa_lite.ShardParallel(mesh_shape=(2, 4)), work, args))
    if "pipeshard" in wanted:
        runners.append(Runner("PipeshardParallel (auto)",
                              f"{args.pipeline_layers} layers, {args.micro_batches} micro-batches",
                              pipeline(args, "auto"), work, args))
    results = run_runners(runners, args)
    serial, rows = results[0], []
    grid_rows = [r.result for r in grid]
    for runner, result in zip(runners[1:], results[1:]):
        if runner in grid:
            if runner is grid[-1]:
                ok = [r for r in grid_rows if not r.error]
                if ok:
                    best = min(ok, key=lambda r: r.step_s)
                    rows.append(dataclasses.replace(best, name="Megatron-style (best of grid)"))
            continue
        rows.append(result)
    return serial, rows, grid_rows


# --- output --------------------------------------------------------------------------------


def _mib(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / 2**20:.2f}"


def _fmt(x, spec) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows, work, num_devices: int) -> list[str]:
    batch = work.batch[next(iter(work.batch))].shape[0]
    lines = ["| method | mesh / config | step (ms) | samples/s | TFLOP/s/device | plan (s) | "
             "compile (s) | peak mem/device (MiB) | predicted mem (MiB) | predicted step (ms) "
             "| measured / predicted | matches serial |",
             "|:--|:--|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.config} | failed: {r.error} ||||||||||")
            continue
        devices = 1 if r.name.startswith("serial") else num_devices
        tflops = work.flops_per_step / r.step_s / devices / 1e12
        ratio = r.step_s / r.predicted_s if r.predicted_s == r.predicted_s else math.nan
        lines.append(
            f"| {r.name} | {r.config} | {r.step_s * 1e3:.1f} | {batch / r.step_s:.0f} | "
            f"{tflops:.2g} | {_fmt(r.plan_s, '.2f')} | {_fmt(r.compile_s, '.1f')} | "
            f"{_mib(r.measured_mem)} | {_mib(r.predicted_mem)} | "
            f"{_fmt(r.predicted_s * 1e3, '.3f')} | {_fmt(ratio, '.0f')}{'x' if ratio == ratio else ''} "
            f"| {r.matches} |")
    return lines


def plot(serial, rows, batch: int, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in [serial] + rows if not r.error]
    labels = [f"{r.name}\n{r.config}" for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.55 * len(ok) + 2), sharey=True)
    y = np.arange(len(ok))
    ax1.barh(y, [batch / r.step_s for r in ok], color=["#999999"] + ["#4c72b0"] * (len(ok) - 1))
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("samples / s (measured, higher is better)")
    ax2.barh(y - 0.2, [r.step_s * 1e3 for r in ok], height=0.4, label="measured", color="#4c72b0")
    ax2.barh(y + 0.2, [r.predicted_s * 1e3 if r.predicted_s == r.predicted_s else 0 for r in ok],
             height=0.4, label="predicted (default CPU link model)", color="#dd8452")
    ax2.set_xscale("log")
    ax2.set_xlabel("step time (ms, log scale)")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"Machine: {platform.platform()}, {os.cpu_count()} CPU cores, python "
            f"{platform.python_version()}, jax {jax.__version__}, {len(jax.devices())} "
            f"{jax.devices()[0].platform} devices ({jax.devices()[0].device_kind}); "
            f"load average {load[0]:.2f}")


def describe(work, args) -> str:
    cfg = work.preset.config
    batch = work.batch[next(iter(work.batch))].shape[0]
    if work.preset.family == "wresnet":
        shape = (f"depth {cfg.num_layers}, width x{cfg.width_factor}, base {cfg.base_channels}, "
                 f"{cfg.image_size}x{cfg.image_size} images, SGD momentum")
    else:
        shape = (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
                 f"seq {cfg.seq_len}, vocab {cfg.vocab_size}, AdamW(eps=1e-3) + clipping")
    return (f"Model: {work.preset.name} ({shape}), {args.dtype} compute, batch {batch}, "
            f"{work.flops_per_step / 1e9:.3f} GFLOP per step (model FLOPs). "
            f"Step time: median of {args.repeats} steps after {args.warmup} warm-up steps.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-tiny",
                        help="model preset (gpt-tiny, llama-tiny, wresnet-tiny, ...)")
    parser.add_argument("--layers", type=int, default=None,
                        help="GPT blocks / Wide-ResNet depth (default: 4 for GPT, preset depth)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=None,
                        help="override the GPT / LLaMA width (default: the preset's)")
    parser.add_argument("--micro-batches", type=int, default=4, help="for pipelines")
    parser.add_argument("--dtype", default="auto",
                        choices=("auto", "float32", "bfloat16", "float16"),
                        help="compute dtype, float32 weights and optimizer state (default: "
                             "bfloat16 on GPU/TPU, float32 on CPU, where bf16 is slower)")
    parser.add_argument("--tag", default=None,
                        help="output file suffix (default: the model family)")
    parser.add_argument("--pipeline-layers", type=int, default=4,
                        help="AutoLayerOption(layer_num=...) for every pipeline")
    parser.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4],
                        help="pipeline degrees of the Megatron-style grid")
    parser.add_argument("--grid", choices=["full", "small"], default="full")
    parser.add_argument("--methods", nargs="+",
                        default=["dp", "zero2", "zero3", "megatron", "shard", "pipeshard"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip memory_analysis() (one more compile per method)")
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--no-write", dest="write", action="store_false")
    args = parser.parse_args(argv)
    if args.layers is None and not args.model.startswith("wresnet"):
        args.layers = 4
    if args.dtype == "auto":
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    command = f"python {' '.join(sys.argv)}"
    print(f"Command: `{command}`")
    print(machine_info())
    start = time.perf_counter()
    work = build(args)
    print(describe(work, args), flush=True)
    serial, rows, grid_rows = run_all(work, args)
    n = len(jax.devices())
    lines = [f"Command: `{command}`  ", machine_info() + f" (at the end; {time.perf_counter() - start:.0f} s in all)  ",
             describe(work, args), ""]
    lines += table([serial] + rows, work, n)
    if grid_rows:
        lines += ["", "Megatron-style grid (uniform stages, (dp, tp) logical mesh per stage; "
                  "pp = 1 is one ShardParallel mesh):", ""]
        lines += table(grid_rows, work, n)
        lines += ["", "Stages of the pipelined grid points:", ""]
        lines += [f"- {r.config}: {r.stages}" for r in grid_rows if r.stages]
    pipe = [r for r in rows if r.name.startswith("PipeshardParallel") and r.stages]
    if pipe:
        lines += ["", f"PipeshardParallel (auto) chose: {pipe[0].stages}"]
    text = "\n".join(lines)
    print()
    print(text)
    if args.write:
        family = args.tag or work.preset.family
        os.makedirs(args.out_dir, exist_ok=True)
        md = os.path.join(args.out_dir, f"throughput_{family}.md")
        with open(md, "w") as f:
            f.write(text + "\n")
        png = os.path.join(args.out_dir, f"throughput_{family}.png")
        batch = work.batch[next(iter(work.batch))].shape[0]
        plot(serial, rows, batch, png, f"{work.preset.name}: {n} simulated {jax.devices()[0].platform} "
             f"devices on {os.cpu_count()} cores")
        print(f"\nwrote {md} and {png}")


if __name__ == "__main__":
    main()
