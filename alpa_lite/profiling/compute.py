"""Matmul throughput per dtype, launch latency, memory bandwidth, and the timing loop.

Input: devices, square matmul sizes and array sizes. Output: `MatmulRow`s (``2 n^3`` flops,
median time), `LaunchRow`s (blocked round trip of a trivial program on one device and on all
of them) and `MemoryBandwidthRow`s (an elementwise pass over a large array) for the
`ProfileDatabase`, and `format_matmul_table` / `format_launch_and_memory` to print them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alpa_lite.cost.kernels import kernel_nodes
from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import build_op_graph
from alpa_lite.profiling.database import LaunchRow, MatmulRow, MemoryBandwidthRow

logger = logging.getLogger(__name__)

DEFAULT_MATMUL_SIZES = {"cpu": (128, 256, 512, 1024), "gpu": (1024, 2048, 4096, 8192)}
# Array sizes (bytes of the input; a pass reads and writes it) of the bandwidth test. The
# largest should dwarf the last-level cache (CPU) or L2 (GPU: 50 MB on H100).
DEFAULT_BANDWIDTH_ARRAY_BYTES = {"cpu": (2**22, 2**26), "gpu": (2**24, 2**30)}
_MAX_CALLS_PER_REPEAT = 64


@dataclasses.dataclass
class TimingScatter:
    """How much the timed repeats of each measurement varied (`timing_scatter`).

    A measurement's spread is half its range over its median (``0.2``: the repeats lay
    within +-20 % of the median). A profile whose repeats scatter prices plans badly: the
    median of a noisy case can be far from what a step sees.
    """

    threshold: float = 0.2
    spreads: list[float] = dataclasses.field(default_factory=list)

    def add(self, samples: Sequence[float]) -> None:
        median = statistics.median(samples)
        self.spreads.append((max(samples) - min(samples)) / (2 * median) if median > 0 else 0.0)

    def warning(self) -> str | None:
        """A sentence for the user when some measurements scattered, else None."""
        scattered = [s for s in self.spreads if s > self.threshold]
        if not scattered:
            return None
        return (f"warning: {len(scattered)} of {len(self.spreads)} measurements varied by more "
                f"than +-{self.threshold:.0%} between repeats (worst +-{max(scattered):.0%}); "
                "their medians may misprice plans. Measure again on an idle machine (no other "
                "jobs on its cores or devices), with more --repeats.")


_SCATTER: contextvars.ContextVar = contextvars.ContextVar("alpa_lite_timing_scatter",
                                                          default=None)


@contextlib.contextmanager
def timing_scatter(threshold: float = 0.2):
    """Collects the spread of every measurement (`run_timed`, launch latency) made inside.

    Example:
        >>> with timing_scatter() as scatter:
        ...     _ = run_timed(jax.jit(lambda x: x + 1), jnp.ones(4), repeats=3)
        >>> len(scatter.spreads)
        1
    """
    scatter = TimingScatter(threshold)
    token = _SCATTER.set(scatter)
    try:
        yield scatter
    finally:
        _SCATTER.reset(token)


def _median(samples: list[float]) -> float:
    """The median of a measurement's repeats (their spread goes to `timing_scatter`)."""
    scatter = _SCATTER.get()
    if scatter is not None:
        scatter.add(samples)
    return statistics.median(samples)


def run_timed(fn: Callable, *args, repeats: int = 5, min_repeat_s: float = 1e-3) -> float:
    """Median seconds of one call of a jitted ``fn(*args)``, after a warm-up call.

    Each repeat issues ``k`` calls back to back and blocks on the last, and reports the
    time divided by ``k`` (nccl-tests' ``iters``): dispatch of call ``i + 1`` overlaps call
    ``i``, so small operations are not measured as pure launch overhead. ``k`` is chosen
    from the warm-up so that a repeat lasts about ``min_repeat_s`` (at most 64 calls).

    Example:
        >>> t = run_timed(jax.jit(lambda x: x + 1), jnp.ones(4), repeats=2)
        >>> t > 0
        True
    """
    if repeats < 1:
        raise InvalidConfigError(f"repeats must be >= 1; got {repeats}. Use e.g. repeats=5.")
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))  # compiles; the second call below measures a warm run
    logger.debug("compile + first run: %.3f s", time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single_s = max(time.perf_counter() - start, 1e-9)
    calls = int(min(_MAX_CALLS_PER_REPEAT, max(1, min_repeat_s // single_s)))
    if jax.process_count() > 1:
        # every process must issue the same calls (a count from each one's own clock would
        # differ and leave a collective waiting), one at a time (in-flight cross-process
        # collectives can deadlock on CPU; see emit/transfer.py)
        calls = 1
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return _median(samples)


def profile_matmul(device=None, *, dtypes: Sequence[str] = ("float32", "bfloat16"),
                   sizes: Sequence[int] | None = None, repeats: int = 5,
                   show_progress: bool = False, devices: Sequence | None = None
                   ) -> tuple[MatmulRow, ...]:
    """Times square ``(n, n) @ (n, n)`` matmuls for every dtype and size.

    With ``devices``, every one of them runs its own matmul at the same time (one sharded
    program) and the row is the time of one device's matmul while all compute: what a
    device of a mesh achieves when its neighbours are busy too. That matters where devices
    share hardware (simulated CPU devices share the host's cores); on GPUs it equals the
    single-device number.

    Args:
        device: the device when ``devices`` is not given (default: ``jax.devices()[0]``).
        devices: devices to load at once (see above).
        dtypes: jax dtype names, e.g. ``("float32", "bfloat16")``.
        sizes: matrix sizes ``n`` (default: by platform, see `DEFAULT_MATMUL_SIZES`).
        repeats: timed repeats; the median is kept.
        show_progress: draw a `rich` progress bar on stderr.

    Returns:
        One `MatmulRow` per (dtype, size); ``row.flops_per_s`` is the achieved throughput.
        On GPUs, float32 dots use jax's default precision (TF32 on Ampere and newer).
    """
    devices = list(devices) if devices is not None else [
        device if device is not None else jax.devices()[0]]
    device = devices[0]
    sizes = tuple(sizes) if sizes is not None else DEFAULT_MATMUL_SIZES.get(
        device.platform, DEFAULT_MATMUL_SIZES["gpu"])
    for dtype in dtypes:
        try:
            jnp.dtype(dtype)
        except TypeError as err:
            raise InvalidConfigError(
                f"Unknown dtype {dtype!r}; use jax dtype names such as 'float32', 'bfloat16', "
                "'float16'.") from err
    cases = [(dtype, n) for dtype in dtypes for n in sizes]
    rows = []
    with progress_bar(show_progress, "matmul", len(cases)) as advance:
        for dtype, n in cases:
            sharding = NamedSharding(Mesh(np.array(devices), ("d",)), P("d"))
            lhs = jax.device_put(jnp.ones((len(devices), n, n), dtype), sharding)
            rhs = jax.device_put(jnp.ones((len(devices), n, n), dtype), sharding)
            seconds = run_timed(jax.jit(jnp.matmul, out_shardings=sharding), lhs, rhs,
                                repeats=repeats)
            rows.append(MatmulRow(dtype=str(jnp.dtype(dtype)), m=n, n=n, k=n, time_s=seconds))
            advance(f"matmul {dtype} n={n}")
    return tuple(rows)


def profile_launch_latency(devices=None, *, repeats: int = 50) -> tuple[LaunchRow, ...]:
    """Median blocked wall time of a trivial jitted program, on one device and on all.

    Each of ``repeats`` calls of ``x + 1`` (one element per device) is issued and waited for
    on its own, so the time is the whole fixed cost of a program: dispatch from Python,
    launch, and completion, with no overlap between calls (unlike `run_timed`).

    Args:
        devices: the devices (default: ``jax.devices()``); the single-device program runs
            on the first one, the sharded one over a 1-D mesh of all of them.
        repeats: timed calls; the median is kept.

    Returns:
        ``LaunchRow(num_devices=1, ...)`` and, with several devices, a second row for all;
        then ``kind="operator"`` rows: the extra time per kernel of a program on 1, half
        and all of the devices (`_operator_latency_s`).

    Example:
        >>> rows = profile_launch_latency(jax.devices()[:1], repeats=3)
        >>> [(r.num_devices, r.kind) for r in rows], rows[0].time_s > 0
        ([(1, 'program'), (1, 'operator')], True)
    """
    if repeats < 1:
        raise InvalidConfigError(f"repeats must be >= 1; got {repeats}. Use e.g. repeats=50.")
    devices = list(devices) if devices is not None else jax.devices()
    program = jax.jit(lambda x: x + 1)
    rows = [LaunchRow(num_devices=1, time_s=_median_blocked_call_s(
        program, jax.device_put(jnp.zeros((1,), jnp.float32), devices[0]), repeats))]
    if len(devices) > 1:
        mesh = jax.sharding.Mesh(np.asarray(devices), ("devices",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
        # from a callback, so that it also builds a global array when devices span processes
        sharded = jax.make_array_from_callback(
            (len(devices),), sharding, lambda index: np.zeros((len(devices),), np.float32)[index])
        rows.append(LaunchRow(num_devices=len(devices),
                              time_s=_median_blocked_call_s(program, sharded, repeats)))
    counts = sorted({1, len(devices)} | ({len(devices) // 2} if len(devices) > 2 else set()))
    rows += [LaunchRow(num_devices=n, time_s=_operator_latency_s(devices[:n]), kind="operator")
             for n in counts]
    return tuple(rows)


def _operator_latency_s(devices, short: int = 16, long: int = 128) -> float:
    """Seconds per kernel in a program on ``devices``: each device runs ``n`` independent
    tiny matmuls, each with an elementwise loop after it (two kernels, `kernel_nodes`), as a
    step's many small kernels are independent of each other (the optimizer's per-parameter
    updates, a layer's branches); the slope between ``short`` and ``long`` of them.

    A chain of the same kernels, each on the last one's result, measured a quarter of this
    on 8 simulated CPU devices (2.8 against 11 us per kernel, 2026-12-07): the runtime
    schedules independent kernels at a cost of their own, and a step of a GPT whose compute
    is negligible took 20 us per compiled kernel (docs/profiling.md)."""
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devices), ("d",)),
                                          jax.sharding.PartitionSpec("d"))

    def run(xs):
        return [jnp.tanh(x @ x) * 0.5 for x in xs]

    times, kernels = [], []
    for n in (short, long):
        xs = [jax.device_put(jnp.full((len(devices), 16, 16), 1.0 + i / n, jnp.float32),
                             sharding) for i in range(n)]
        times.append(run_timed(jax.jit(run, out_shardings=sharding), xs, repeats=5))
        kernels.append(int(kernel_nodes(build_op_graph(jax.make_jaxpr(run)(xs))).sum()))
    return max((times[1] - times[0]) / (kernels[1] - kernels[0]), 1e-9)


def _median_blocked_call_s(fn: Callable, arg, repeats: int) -> float:
    jax.block_until_ready(fn(arg))  # compile
    jax.block_until_ready(fn(arg))  # first warm run: caches settle
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        samples.append(time.perf_counter() - start)
    return _median(samples)


# passes of the bandwidth measurement in one program, in place after the first: one pass
# into a fresh buffer measured the first touch of its pages (simulated CPU devices: 7.7 GB/s
# on one device against 24.4 GB/s in place, 2026-12-07), which a step's reused buffers do not
# pay
BANDWIDTH_PASSES = 8


def profile_memory_bandwidth(device=None, *, array_bytes: Sequence[int] | None = None,
                             repeats: int = 5, devices: Sequence | None = None
                             ) -> tuple[MemoryBandwidthRow, ...]:
    """Achieved memory bandwidth: time of ``y = 2 * x`` over a large float32 array.

    The pass reads ``x`` and writes ``y``, so it moves twice the array's bytes; the row's
    ``bytes_per_s`` is that divided by the median time of one pass (`run_timed` of
    `BANDWIDTH_PASSES` passes in a loop, which reuses its buffer as a step does). This is
    the ``W`` of the roofline ``max(flops / peak, bytes / W)`` (`LogicalMesh.compute_time_s`).

    Args:
        device: the device when ``devices`` is not given (default: ``jax.devices()[0]``).
        devices: devices that each scale their own array at once (per-device bandwidth while
            all are busy, as `profile_matmul`).
        array_bytes: sizes of ``x`` in bytes (per device) (default: by platform, see
            `DEFAULT_BANDWIDTH_ARRAY_BYTES`); rounded down to whole float32 elements.
        repeats: timed repeats; the median is kept.

    Example:
        >>> (row,) = profile_memory_bandwidth(array_bytes=[4096], repeats=2)
        >>> row.num_bytes, row.bytes_per_s > 0
        (8192, True)
    """
    devices = list(devices) if devices is not None else [
        device if device is not None else jax.devices()[0]]
    device = devices[0]
    sizes = tuple(array_bytes) if array_bytes is not None else DEFAULT_BANDWIDTH_ARRAY_BYTES.get(
        device.platform, DEFAULT_BANDWIDTH_ARRAY_BYTES["gpu"])
    if any(int(size) < 4 for size in sizes):
        raise InvalidConfigError(
            f"array_bytes must be at least 4 bytes (one float32) each; got {list(sizes)}. "
            "Use e.g. array_bytes=[2**26].")
    sharding = NamedSharding(Mesh(np.array(devices), ("d",)), P("d"))
    scale = jax.jit(lambda x: jax.lax.fori_loop(0, BANDWIDTH_PASSES, lambda _, y: y * 2, x),
                    out_shardings=sharding)
    rows = []
    for size in sizes:
        elements = int(size) // 4
        x = jax.device_put(jnp.ones((len(devices) * elements,), jnp.float32), sharding)
        seconds = run_timed(scale, x, repeats=repeats) / BANDWIDTH_PASSES
        rows.append(MemoryBandwidthRow(num_bytes=2 * 4 * elements, time_s=seconds))
        del x
    return tuple(rows)


def format_launch_and_memory(launches: Sequence[LaunchRow],
                             bandwidths: Sequence[MemoryBandwidthRow]) -> str:
    """Launch latency per device count and memory bandwidth per array size, as a table."""
    lines = ["# launch latency: one blocked call of a trivial jitted program (program), and the",
             "# extra time per operator inside a program (operator)",
             "#  devices    time (us)  kind"]
    lines += [f"{r.num_devices:>10} {r.time_s * 1e6:>12.2f}  {r.kind}" for r in launches]
    lines += ["# memory bandwidth: y = 2 * x, bytes read + written",
              "#    bytes moved    time (us)      GB/s"]
    lines += [f"{r.num_bytes:>16} {r.time_s * 1e6:>12.1f} {r.bytes_per_s / 1e9:>9.2f}"
              for r in bandwidths]
    return "\n".join(lines)


def format_matmul_table(rows: Sequence[MatmulRow]) -> str:
    """A table of achieved matmul throughput, one line per dtype and size."""
    lines = ["#    dtype        m        n        k      time    TFLOP/s",
             "#                                           (us)"]
    for r in rows:
        lines.append(f"{r.dtype:>10} {r.m:>8} {r.n:>8} {r.k:>8} {r.time_s * 1e6:>9.1f} "
                     f"{r.flops_per_s / 1e12:>10.4f}")
    return "\n".join(lines)


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, total: int):
    """Yields ``advance(description=None)``; draws a `rich` bar on stderr only when enabled."""
    if not enabled:
        yield lambda description=None: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda description=None: bar.update(
            task, advance=1, description=description or label)
