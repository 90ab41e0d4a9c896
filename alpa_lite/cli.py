"""The ``alpa-lite`` command line: profile a cluster, show cluster specs.

    alpa-lite profile comm [--devices N] [--max-bytes 64MiB] [--kinds all-reduce,...]
                           [--group-sizes 2,8] [--repeats 5] [--out db.json]
    alpa-lite profile compute [--devices N] [--dtypes float32,bfloat16] [--sizes 256,1024]
                              [--bandwidth-bytes 4MiB,64MiB] [--launch-repeats 50]
                              [--out db.json]
    alpa-lite cluster show PRESET|FILE [--profile db.json]
    alpa-lite launch --num-processes N [--devices-per-process K] [--coordinator HOST:PORT]
                     -- CMD ...

jax is imported only inside the command handlers, after ``--devices N`` has set XLA_FLAGS
(jax reads it when its backend starts), so this module must not import jax at the top.
Every subcommand is one ``_add_*_command(subparsers)`` function listed in `_COMMANDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Sequence

from alpa_lite.cluster import (CLUSTER_PRESETS, ClusterSpec, get_cluster_preset, parse_bytes,
                               parse_cluster_string)
from alpa_lite.config import SCHEDULES
from alpa_lite.errors import AlpaLiteError, InvalidConfigError
from alpa_lite.launch import with_device_count
from alpa_lite.profiling.database import COLLECTIVE_KINDS, ProfileDatabase



def main(argv: Sequence[str] | None = None) -> int:
    """Runs one ``alpa-lite`` command; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except AlpaLiteError as err:
        print(f"alpa-lite: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alpa-lite", description="Automatic parallelization for JAX (an Alpa re-creation).")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


# ------------------------------------------------------------------ profile


def _add_profile_command(subparsers) -> None:
    profile = subparsers.add_parser("profile", help="measure collectives or matmul throughput")
    kinds = profile.add_subparsers(dest="what", required=True, metavar="WHAT")

    comm = kinds.add_parser("comm", help="time collectives (nccl-tests-style table)")
    _add_device_options(comm)
    comm.add_argument("--max-bytes", type=_byte_count, default=None,
                      help="largest message, e.g. 64MiB (default: by device memory; 16MiB "
                           "on CPU)")
    comm.add_argument("--kinds", type=_comma_list, default=list(COLLECTIVE_KINDS),
                      help=f"comma-separated subset of {','.join(COLLECTIVE_KINDS)}")
    comm.add_argument("--group-sizes", type=_int_list, default=None,
                      help="devices per group, e.g. 2,4,8 (default: every divisor > 1)")
    comm.add_argument("--repeats", type=int, default=5, help="timed repeats (median kept)")
    comm.set_defaults(handler=_run_profile_comm)

    compute = kinds.add_parser(
        "compute", help="time square matmuls per dtype, launch latency and memory bandwidth")
    _add_device_options(compute)
    compute.add_argument("--dtypes", type=_comma_list, default=["float32", "bfloat16"],
                         help="comma-separated jax dtype names")
    compute.add_argument("--sizes", type=_int_list, default=None,
                         help="matrix sizes n of n x n matmuls, e.g. 256,1024")
    compute.add_argument("--repeats", type=int, default=5, help="timed repeats (median kept)")
    compute.add_argument("--bandwidth-bytes", type=_byte_list, default=None,
                         help="array sizes of the memory-bandwidth pass, e.g. 4MiB,64MiB "
                              "(default: by platform)")
    compute.add_argument("--launch-repeats", type=int, default=50,
                         help="blocked calls of the trivial program (median kept)")
    compute.set_defaults(handler=_run_profile_compute)


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=None, metavar="N",
                        help="simulate N CPU devices (sets XLA_FLAGS before jax starts)")
    parser.add_argument("--out", default=None, metavar="DB.json",
                        help="write the rows to this profile database; an existing file keeps "
                             "its other section (comm keeps matmuls, compute keeps collectives)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--max-scatter", type=float, default=0.2, metavar="FRACTION",
                        help="warn when a measurement's repeats vary by more than +- this "
                             "fraction of their median (default 0.2)")


def _run_profile_comm(args) -> int:
    devices = _start_devices(args.devices)
    from alpa_lite.profiling.comm import (describe_devices, format_collective_table,
                                          profile_collectives)
    from alpa_lite.profiling.compute import timing_scatter

    import jax

    with timing_scatter(args.max_scatter) as scatter:
        rows = profile_collectives(devices, max_bytes=args.max_bytes, kinds=args.kinds,
                                   group_sizes=args.group_sizes, repeats=args.repeats,
                                   show_progress=not args.no_progress and jax.process_index() == 0)
    if jax.process_index() != 0:  # every process measured; process 0 reports
        return 0
    print(format_collective_table(rows))
    _warn_scatter(scatter)
    if args.out:
        _update_database(args.out, describe_devices(devices), collectives=rows)
    return 0


def _run_profile_compute(args) -> int:
    devices = _start_devices(args.devices)
    from alpa_lite.profiling.comm import describe_devices
    from alpa_lite.profiling.compute import (format_launch_and_memory, format_matmul_table,
                                             profile_launch_latency, profile_matmul,
                                             profile_memory_bandwidth, timing_scatter)

    with timing_scatter(args.max_scatter) as scatter:
        # every device computes at once: what each achieves in a mesh (shared CPU cores)
        rows = profile_matmul(devices=devices, dtypes=args.dtypes, sizes=args.sizes,
                              repeats=args.repeats, show_progress=not args.no_progress)
        launches = profile_launch_latency(devices, repeats=args.launch_repeats)
        bandwidths = profile_memory_bandwidth(devices=devices, array_bytes=args.bandwidth_bytes,
                                              repeats=args.repeats)
    print(format_matmul_table(rows))
    print(format_launch_and_memory(launches, bandwidths))
    _warn_scatter(scatter)
    if args.out:
        _update_database(args.out, describe_devices(devices), matmuls=rows, launches=launches,
                         memory_bandwidths=bandwidths)
    return 0


def _warn_scatter(scatter) -> None:
    """Says on stderr when the profile's repeats scattered (`TimingScatter.warning`)."""
    warning = scatter.warning()
    if warning:
        print(warning, file=sys.stderr)


def _start_devices(num_cpu_devices: int | None) -> list:
    """Imports jax (after setting XLA_FLAGS for ``--devices``) and returns its devices."""
    if num_cpu_devices is not None:
        if num_cpu_devices < 1:
            raise InvalidConfigError(
                f"--devices must be a positive device count; got {num_cpu_devices}.")
        os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""),
                                                     num_cpu_devices)
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from alpa_lite import distributed

    if num_cpu_devices is not None:
        try:
            jax.config.update("jax_num_cpu_devices", num_cpu_devices)
        except RuntimeError:  # the backend already started; the check below explains
            pass
    distributed.initialize()  # under alpa-lite launch, Slurm, ...: join the job first
    devices = jax.devices()
    if num_cpu_devices is not None and jax.process_count() > 1:
        num_cpu_devices *= jax.process_count()
    if num_cpu_devices is not None and (len(devices) != num_cpu_devices
                                        or devices[0].platform != "cpu"):
        raise InvalidConfigError(
            f"--devices {num_cpu_devices} asked for {num_cpu_devices} CPU devices but jax had "
            f"already started with {len(devices)} {devices[0].platform} device(s). Run "
            "alpa-lite in a fresh process, or drop --devices.")
    return devices


def _update_database(path: str, metadata, **rows) -> None:
    database = ProfileDatabase.load(path) if os.path.exists(path) else ProfileDatabase()
    database = database.replace(metadata=tuple(dict(database.metadata + metadata).items()),
                                **rows)
    database.save(path)
    print(f"# wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------ cluster


def _add_cluster_command(subparsers) -> None:
    cluster = subparsers.add_parser("cluster", help="show cluster specs")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show", help="describe a preset or a cluster JSON file",
        description=f"Presets: {', '.join(sorted(CLUSTER_PRESETS))}.")
    show.add_argument("cluster", metavar="PRESET|FILE")
    show.add_argument("--hosts", type=int, default=None, help="override the host count")
    show.add_argument("--profile", default=None, metavar="DB.json",
                      help="attach a profile database (links get its alpha-beta fit)")
    show.add_argument("--json", action="store_true", help="print the spec as JSON")
    show.set_defaults(handler=_run_cluster_show)


def _run_cluster_show(args) -> int:
    spec = load_cluster(args.cluster)
    if args.hosts is not None:
        spec = spec.with_hosts(args.hosts)
    if args.profile:
        spec = spec.with_profile(ProfileDatabase.load(args.profile))
    print(spec.to_json() if args.json else spec.describe())
    return 0


def load_cluster(preset_or_path: str) -> ClusterSpec:
    """A preset by name, else a JSON file written by `ClusterSpec.save`."""
    if preset_or_path in CLUSTER_PRESETS or not os.path.exists(preset_or_path):
        if preset_or_path.endswith(".json"):
            return ClusterSpec.load(preset_or_path)  # raises a file-not-found message
        return get_cluster_preset(preset_or_path)
    return ClusterSpec.load(preset_or_path)


# ------------------------------------------------------------------ argument types


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
    except InvalidConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _byte_list(text: str) -> list[int]:
    return [_byte_count(item) for item in _comma_list(text)]


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in _comma_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 2,4,8; got {text!r}") from err


# ------------------------------------------------------------------ registry
#
# One entry per top-level subcommand. `alpa-lite plan` goes here: write
# `_add_plan_command(subparsers)` that adds its parser and sets `handler=` (a function taking
# the parsed args and returning an exit status), then append it to this tuple.
# ------------------------------------------------------------------ plan (simulation)


def _add_plan_command(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan", help="plan a model for a cluster you do not have (no devices, no weights)")
    plan.add_argument("--model", required=True,
                      help="model preset (e.g. gpt-1.3b, llama2-13b), or a family (gpt, llama) "
                           "with --hidden --num-layers --heads [--vocab --seq-len --ffn]")
    plan.add_argument("--hidden", type=int, default=None, help="model width (with a family)")
    plan.add_argument("--heads", type=int, default=None, help="attention heads (with a family)")
    plan.add_argument("--vocab", type=int, default=None, help="vocabulary (with a family)")
    plan.add_argument("--ffn", type=int, default=None,
                      help="MLP width (LLaMA's SwiGLU size; GPT: a multiple of --hidden)")
    plan.add_argument("--cluster", required=True,
                      help="HOSTSxDEVICES (e.g. 50x4) or a cluster preset / JSON file")
    plan.add_argument("--device", default="a100-80gb-8x",
                      help="preset whose links and flop/s an HOSTSxDEVICES cluster uses")
    plan.add_argument("--memory-per-device", type=_byte_count, default=None,
                      help="e.g. 32GiB (default: the device preset's)")
    plan.add_argument("--num-layers", type=int, default=None)
    plan.add_argument("--batch-size", type=int, default=None)
    plan.add_argument("--seq-len", type=int, default=None)
    plan.add_argument("--micro-batches", type=int, default=None)
    plan.add_argument("--dtype", default="auto",
                      choices=("auto", "float32", "bfloat16", "float16"),
                      help="compute dtype; parameters and optimizer state stay float32. auto "
                           "(default): the device's faster half type (bfloat16 on A100/H100, "
                           "float16 on V100), float32 where none is faster")
    plan.add_argument("--remat", default="auto", choices=("off", "layer", "auto"),
                      help="recompute each layer's forward in the backward pass: never, "
                           "always, or (default) where the planner needs it to fit "
                           "(pipelines; it prices every layer both ways)")
    plan.add_argument("--method", default="auto",
                      choices=("auto", "shard", "dp", "zero2", "zero3", "megatron"))
    plan.add_argument("--tp", type=int, default=None,
                      help="price a named Megatron layout: tensor-parallel degree (in a host)")
    plan.add_argument("--pp", type=int, default=None, help="named layout: pipeline stages")
    plan.add_argument("--dp", type=int, default=None,
                      help="named layout: data-parallel degree (default: devices / (tp pp))")
    plan.add_argument("--micro-batch-size", type=int, default=None,
                      help="named layout: sequences per micro-batch per replica (megatron, dp, "
                           "zero2, zero3)")
    plan.add_argument("--schedule", default=None,
                      choices=SCHEDULES,
                      help="pipeline schedule (default: auto for --method auto, which prices "
                           "1f1b, zb-h1 and interleaved-1f1b; 1f1b for a named Megatron layout)")
    plan.add_argument("--virtual-stages", type=int, default=None,
                      help="named Megatron layout with --schedule interleaved-1f1b: model "
                           "chunks per stage (default 2)")
    plan.add_argument("--layout", default=None, metavar="LAYOUT.json",
                      help="price a layout file ({\"method\": \"megatron\", \"tp\": 8, ...}) or "
                           "the JSON of an earlier `alpa-lite plan --json`")
    plan.add_argument("--explain", action="store_true",
                      help="print where the predicted step time and memory go")
    plan.add_argument("--compare", action="store_true",
                      help="also plan Megatron-style 3-D grids and ZeRO, print them side by side")
    plan.add_argument("--json", default=None, metavar="PLAN.json", help="write the result")
    plan.add_argument("--no-progress", action="store_true", help="no progress line")
    plan.add_argument("--workers", type=_positive_int, default=None,
                      help="processes that price layers (default: one per core)")
    plan.set_defaults(handler=_run_plan)


def _plan_model(args):
    """The preset ``--model`` names, or a family with the dimension flags."""
    from alpa_lite.models.presets import FAMILIES, custom_preset, get_preset

    dims = {"hidden": args.hidden, "heads": args.heads, "vocab": args.vocab, "ffn": args.ffn}
    if args.model not in FAMILIES:
        given = [f"--{k}" for k, v in dims.items() if v is not None]
        if given:
            raise InvalidConfigError(
                f"{', '.join(given)} describe a model of a family; --model {args.model!r} is a "
                f"preset. Use --model gpt or --model llama with them, or drop them.")
        return get_preset(args.model)
    missing = [f"--{k}" for k in ("hidden", "heads") if dims[k] is None] + (
        ["--num-layers"] if args.num_layers is None else [])
    if missing:
        raise InvalidConfigError(
            f"--model {args.model} needs {', '.join(missing)} (and may take --vocab, "
            "--seq-len, --batch-size, --ffn), e.g. --model gpt --hidden 2304 --num-layers 24 "
            "--heads 24 --seq-len 2048 --batch-size 512.")
    return custom_preset(args.model, hidden=args.hidden, num_layers=args.num_layers,
                         heads=args.heads, vocab=args.vocab, seq_len=args.seq_len,
                         batch=args.batch_size or 1024, ffn=args.ffn)


def _plan_layout(args):
    """The named layout of ``--layout`` or of the layout flags, or None (search)."""
    from alpa_lite.layout import Layout

    if args.layout is not None:
        return Layout.load(args.layout)
    named = args.tp is not None or args.pp is not None or args.dp is not None or (
        args.micro_batch_size is not None)
    if not named:
        return None
    if args.method not in ("megatron", "dp", "zero2", "zero3"):
        raise InvalidConfigError(
            f"--tp/--pp/--dp/--micro-batch-size name a layout of method megatron, dp, zero2 "
            f"or zero3; got --method {args.method}. Add e.g. --method megatron.")
    return Layout(method=args.method, tp=args.tp or 1, pp=args.pp or 1, dp=args.dp,
                  micro_batch_size=args.micro_batch_size,
                  schedule=args.schedule if args.schedule not in (None, "auto") else "1f1b",
                  remat=args.remat, virtual_stages=args.virtual_stages)


def _plan_cluster(args) -> ClusterSpec:
    if re.fullmatch(r"\s*\d+\s*x\s*\d+\s*", args.cluster):
        hosts, per_host = parse_cluster_string(args.cluster)
        base = load_cluster(args.device)
        spec = dataclasses.replace(base, num_hosts=hosts, devices_per_host=per_host,
                                   name=f"{args.cluster} x {base.device_kind}")
    else:
        spec = load_cluster(args.cluster)
    if args.memory_per_device is not None:
        spec = spec.with_memory(args.memory_per_device)
    return spec


def _run_plan(args) -> int:
    import json

    from alpa_lite.simulate import simulate, simulation_to_dict

    cluster = _plan_cluster(args)
    if args.dtype == "auto":
        args.dtype = cluster.training_dtype
    preset = _plan_model(args).with_overrides(
        num_layers=args.num_layers, batch_size=args.batch_size, seq_len=args.seq_len,
        dtype=None if args.dtype == "float32" else args.dtype)
    layout = _plan_layout(args)
    if layout is not None:
        args.method, args.remat = layout.method, layout.remat
    methods = [args.method] + ([m for m in ("megatron", "zero2", "zero3") if m != args.method]
                               if args.compare else [])
    results, skipped = [], []
    for method in methods:
        print(f"# planning {preset.name} ({preset.config.num_layers} layers, batch "
              f"{preset.default_batch_size}) on {cluster.num_hosts}x{cluster.devices_per_host} "
              f"devices, {cluster.memory_per_device_bytes / 2**30:.0f} GiB each, method "
              f"{method}, {args.dtype}, remat {args.remat} ...", file=sys.stderr)
        try:
            results.append(simulate(preset, cluster, method=method,
                                    num_micro_batches=args.micro_batches, remat=args.remat,
                                    progress=not args.no_progress,
                                    layout=layout if method == args.method else None,
                                    schedule=args.schedule or "auto",
                                    workers=args.workers))
        except AlpaLiteError as err:
            if method == args.method:
                raise
            skipped.append(f"{method}: not applicable: {err}")
    for result in results:
        print(_format_simulation(result, cluster))
        if args.explain and result.extra.breakdown is not None:
            print(result.extra.breakdown.format())
    for line in skipped:
        print(line)
    if len(results) > 1:
        print(_format_comparison(results, cluster))
        if args.explain:
            from alpa_lite.explain import format_side_by_side

            print(format_side_by_side({r.extra.method: r.extra.breakdown for r in results
                                       if r.extra.breakdown is not None}))
    if args.json:
        payload = {"model": preset.name, "num_layers": preset.config.num_layers,
                   "batch_size": preset.default_batch_size, "dtype": args.dtype,
                   "remat": args.remat,
                   "cluster": json.loads(cluster.to_json()),
                   **simulation_to_dict(results[0]),
                   "compare": [simulation_to_dict(r) for r in results[1:]]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"# wrote {args.json}", file=sys.stderr)
    return 0


def _block_ranges(blocks) -> str:
    """``0-3`` for consecutive blocks; ``0-1,4-5`` for an interleaved stage's chunks."""
    from alpa_lite.simulate import block_runs

    return ",".join(f"{a}-{b}" for a, b in block_runs(blocks))


def _format_simulation(plan, cluster) -> str:
    gib, info = 2**30, plan.extra
    fits = info.memory_per_device_bytes <= cluster.memory_per_device_bytes
    lines = [f"method {info.method}: predicted step time {info.predicted_step_time_s:.4g} s, "
             f"memory/device {info.memory_per_device_bytes / gib:.2f} GiB "
             f"({'fits' if fits else 'DOES NOT FIT'} in "
             f"{cluster.memory_per_device_bytes / gib:.0f} GiB), search {plan.plan_time_s:.1f} s",
             f"  details: {info.details(plan.num_micro_batches)}"]
    if plan.stages:
        lines.append(f"  {'stage':>5} {'blocks':<12} {'submesh':<9} {'logical':<9} "
                     f"{'s/micro-batch':>14} {'memory/device':>14} {'remat':>5} {'lean':>5}")
        for st in plan.stages:
            blocks = _block_ranges(st.layers)
            lines.append(f"  {st.stage:>5} {blocks:<12} {str(st.submesh):<9} "
                         f"{str(st.logical_mesh):<9} {st.forward_s + st.backward_s:>14.4g} "
                         f"{st.peak_memory_bytes / gib:>11.2f} GiB "
                         f"{'yes' if st.remat else 'no':>5} {st.lean or 'no':>5}")
    return "\n".join(lines)


def _format_comparison(plans, cluster) -> str:
    budget = cluster.memory_per_device_bytes
    lines = ["", f"{'method':<10} {'step time (s)':>14} {'memory/device':>14} {'fits':>5}"]
    for p in plans:
        fits = p.peak_memory_bytes <= budget
        lines.append(f"{p.extra.method:<10} {p.predicted_step_time_s:>14.4g} "
                     f"{p.peak_memory_bytes / 2**30:>10.2f} GiB {'yes' if fits else 'no':>5}")
    feasible = [p for p in plans if p.peak_memory_bytes <= budget]
    auto = plans[0]
    manual = [p for p in feasible if p is not auto]
    if manual and auto in feasible:
        best = min(manual, key=lambda p: p.predicted_step_time_s)
        ratio = best.predicted_step_time_s / auto.predicted_step_time_s
        lines.append(f"{auto.extra.method} vs best manual ({best.extra.method}): {ratio:.2f}x "
                     "predicted speedup")
    return "\n".join(lines)


# ------------------------------------------------------------------ launch


def _add_launch_command(subparsers) -> None:
    launch = subparsers.add_parser(
        "launch", help="run N local processes of a command as one jax.distributed job",
        description="Runs N processes of CMD on this machine as one jax.distributed job "
                    "(alpa_lite.distributed.initialize() in CMD finds it). Output lines are "
                    "prefixed with [process index]; when one process fails the others are "
                    "ended and its status is returned.")
    launch.add_argument("--num-processes", type=int, required=True, metavar="N")
    launch.add_argument("--devices-per-process", type=int, default=None, metavar="K",
                        help="give each process K simulated CPU devices (tests, laptops)")
    launch.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="coordination service address (default: 127.0.0.1 and a free "
                             "port)")
    launch.add_argument("--grace-period", type=float, default=10.0, metavar="S",
                        help="seconds between SIGTERM and SIGKILL when ending processes")
    launch.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    launch.set_defaults(handler=_run_launch)


def _run_launch(args) -> int:
    from alpa_lite.launch import Launcher

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return Launcher(command, args.num_processes, devices_per_process=args.devices_per_process,
                    coordinator=args.coordinator, grace_period_s=args.grace_period).run()


_COMMANDS = (_add_profile_command, _add_cluster_command, _add_plan_command, _add_launch_command)


if __name__ == "__main__":
    sys.exit(main())
