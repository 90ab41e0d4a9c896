"""Matmul throughput per dtype, and the timing loop every profiler here uses.

Input: a device and square matmul sizes. Output: `MatmulRow`s (``2 n^3`` flops, median time)
for the `ProfileDatabase`, and `format_matmul_table` to print them.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from alpa_lite.errors import InvalidConfigError
from alpa_lite.profiling.database import MatmulRow

logger = logging.getLogger(__name__)

DEFAULT_MATMUL_SIZES = {"cpu": (128, 256, 512, 1024), "gpu": (1024, 2048, 4096, 8192)}
_MAX_CALLS_PER_REPEAT = 64


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
    return statistics.median(samples)


def profile_matmul(device=None, *, dtypes: Sequence[str] = ("float32", "bfloat16"),
                   sizes: Sequence[int] | None = None, repeats: int = 5,
                   show_progress: bool = False) -> tuple[MatmulRow, ...]:
    """Times square ``(n, n) @ (n, n)`` matmuls on one device for every dtype and size.

    Args:
        device: the device (default: ``jax.devices()[0]``).
        dtypes: jax dtype names, e.g. ``("float32", "bfloat16")``.
        sizes: matrix sizes ``n`` (default: by platform, see `DEFAULT_MATMUL_SIZES`).
        repeats: timed repeats; the median is kept.
        show_progress: draw a `rich` progress bar on stderr.

    Returns:
        One `MatmulRow` per (dtype, size); ``row.flops_per_s`` is the achieved throughput.
        On GPUs, float32 dots use jax's default precision (TF32 on Ampere and newer).
    """
    device = device if device is not None else jax.devices()[0]
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
            lhs = jax.device_put(jnp.ones((n, n), dtype), device)
            rhs = jax.device_put(jnp.ones((n, n), dtype), device)
            seconds = run_timed(jax.jit(jnp.matmul), lhs, rhs, repeats=repeats)
            rows.append(MatmulRow(dtype=str(jnp.dtype(dtype)), m=n, n=n, k=n, time_s=seconds))
            advance(f"matmul {dtype} n={n}")
    return tuple(rows)


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
