"""Collective-communication profiler: nccl-tests-style timings of jax collectives.

Input: devices, message sizes, collective kinds and group sizes. Output: `CollectiveRow`s
(kind, group size, bytes, median seconds, link class) for the `ProfileDatabase`, and
`format_collective_table` to print them with algbw and busbw as nccl-tests does.

Each collective runs under ``jax.shard_map`` on a mesh ``(num_groups, group_size)``: every
group of ``group_size`` devices runs it at the same time, as every row of a 2-D logical mesh
does in a sharded program. Consecutive devices form a group (devices of one host first);
when there are several hosts, strided groups that cross hosts are measured as well.

A row's time is what one collective costs *inside* a program, as in a training step. It is
measured two ways, each as a slope from a program of one collective to a program of `CHAIN`,
and the row keeps the larger:

- a chain: each collective on the last one's result, as a tensor-parallel layer's are. A
  reduce-scatter is chained with an all-gather back to full size, and the all-gather's own
  time (measured by its chain) is taken off; an all-gather's chain slices its result back to
  its input, a copy of the input's size that the row keeps;
- side by side: `CHAIN` independent collectives, as a step's per-parameter gradient
  reductions and ZeRO's gathers are. On 8 simulated CPU devices these cost more (an all-
  gather of 1 KiB 151 against 52 us, an all-reduce 173 against 58; the runtime runs the
  independent work between them at once); on a GPU, XLA combines them and the chain is the
  larger.

A program of one collective alone also pays the program's launch and buffer set-up; on 8
simulated CPU devices that was 280 us against 50 us for a 1 KiB all-reduce, 7.4 ms against
3.3 ms for 4 MiB (docs/profiling.md).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alpa_lite.errors import InvalidConfigError
from alpa_lite.profiling.compute import progress_bar, run_timed
from alpa_lite.profiling.database import COLLECTIVE_KINDS, CollectiveRow

logger = logging.getLogger(__name__)

MIN_MESSAGE_BYTES = 1024
CHAIN = 8  # collectives per program of the second timing (the slope's other end)
_ITEMSIZE = 4  # float32 payloads
_AXES = ("group", "member")


def default_max_bytes(devices: Sequence) -> int:
    """Largest message worth profiling: 1 GiB, or 1/16 of device memory, or 16 MiB on CPU.

    A collective holds a few buffers of this size per device (input, output, temporaries).
    """
    device = devices[0]
    if device.platform == "cpu":
        return 2**24
    try:
        stats = device.memory_stats() or {}
    except (RuntimeError, NotImplementedError):  # backends without allocator statistics
        stats = {}
    limit = stats.get("bytes_limit")
    if not limit:
        return 2**28
    return int(min(2**30, 2 ** int(np.log2(max(limit // 16, MIN_MESSAGE_BYTES)))))


def default_message_sizes(max_bytes: int, min_bytes: int = MIN_MESSAGE_BYTES) -> tuple[int, ...]:
    """Powers of two from ``min_bytes`` (1 KiB) up to ``max_bytes``.

    Example:
        >>> default_message_sizes(8192)
        (1024, 2048, 4096, 8192)
    """
    if max_bytes < min_bytes:
        raise InvalidConfigError(
            f"max_bytes={max_bytes} is below the smallest message ({min_bytes} bytes). "
            f"Use max_bytes >= {min_bytes}.")
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= 2
    return tuple(sizes)


def default_group_sizes(num_devices: int) -> tuple[int, ...]:
    """Every divisor of ``num_devices`` above 1: the sizes a mesh axis can have."""
    return tuple(g for g in range(2, num_devices + 1) if num_devices % g == 0)


def profile_collectives(devices: Sequence | None = None, *, sizes: Sequence[int] | None = None,
                        max_bytes: int | None = None,
                        kinds: Sequence[str] = COLLECTIVE_KINDS,
                        group_sizes: Sequence[int] | None = None, repeats: int = 5,
                        show_progress: bool = False) -> tuple[CollectiveRow, ...]:
    """Times every collective kind x device group x message size.

    Args:
        devices: the devices (default ``jax.devices()``), host-major as jax lists them.
        sizes: per-device message sizes in bytes (nccl-tests convention, see
            `alpa_lite.profiling.database`); default powers of two from 1 KiB to ``max_bytes``.
        max_bytes: cap of the default sizes (default `default_max_bytes`).
        kinds: a subset of ``("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
            "send-recv")``. send-recv is a ring shift: device ``i`` of a group sends to
            ``i + 1`` and receives from ``i - 1`` (nccl-tests' sendrecv).
        group_sizes: devices per group; each must divide the device count (default: every
            divisor above 1).
        repeats: timed repeats per case; the median is kept.
        show_progress: draw a `rich` progress bar on stderr.

    Returns:
        One row per case. Sizes are rounded down so every group member gets whole float32
        elements (``row.num_bytes`` is the size actually moved).
    """
    devices = list(devices) if devices is not None else jax.devices()
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in COLLECTIVE_KINDS]
    if bad or not kinds:
        raise InvalidConfigError(
            f"Unknown collective kinds {bad or kinds}; expected a non-empty subset of "
            f"{list(COLLECTIVE_KINDS)}.")
    groups = tuple(group_sizes) if group_sizes is not None else default_group_sizes(len(devices))
    bad_groups = [g for g in groups if g < 2 or len(devices) % g]
    if bad_groups or not groups:
        raise InvalidConfigError(
            f"Group sizes {bad_groups or groups} do not divide the {len(devices)} devices into "
            f"groups of 2 or more; use some of {list(default_group_sizes(len(devices)))}.")
    sizes = tuple(sizes) if sizes is not None else default_message_sizes(
        max_bytes if max_bytes is not None else default_max_bytes(devices))
    cases = [(kind, layout, size) for layout in _enumerate_layouts(devices, groups)
             for kind in kinds for size in sizes]
    rows = []
    gathers: dict = {}  # (mesh, bytes) -> all-gather seconds, for the reduce-scatter's chain
    with progress_bar(show_progress, "collectives", len(cases)) as advance:
        for kind, (mesh, link), size in cases:
            if jax.process_count() > 1:  # no process starts a case before all ended the last
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"alpa_lite profile {kind} {size}")
            row = _profile_one(kind, mesh, link, size, repeats, gathers)
            if row is not None:
                rows.append(row)
            advance(f"{kind} n={mesh.shape['member']} {size} B")
    return monotone_in_size(rows)


def monotone_in_size(rows: Sequence[CollectiveRow]) -> tuple[CollectiveRow, ...]:
    """Rows whose time never falls as the message grows: a collective of fewer bytes is
    given at most the time of the next larger one of its kind, group and link (the slope
    of small messages is the noisiest measurement).

    Example:
        >>> rows = [CollectiveRow(kind="all-reduce", group_size=2, num_bytes=b, time_s=t,
        ...                       link="intra") for b, t in ((1024, 5e-4), (2048, 1e-4))]
        >>> [r.time_s for r in monotone_in_size(rows)]
        [0.0001, 0.0001]
    """
    out, cap = [], {}
    for row in sorted(rows, key=lambda r: -r.num_bytes):
        key = (row.kind, row.group_size, row.link, row.num_groups)
        time_s = min(row.time_s, cap.get(key, row.time_s))
        cap[key] = time_s
        out.append(dataclasses.replace(row, time_s=time_s))
    return tuple(sorted(out, key=lambda r: (r.kind, r.group_size, r.link, r.num_groups,
                                            r.num_bytes)))


def format_collective_table(rows: Sequence[CollectiveRow]) -> str:
    """nccl-tests-style tables, one per (kind, group size, link), plus average bus bandwidth.

    Columns: size (B), count (float32 elements), type, time (us), algbw and busbw (GB/s,
    10^9 bytes per second).
    """
    lines = []
    sections: dict[tuple, list[CollectiveRow]] = {}
    for row in rows:
        sections.setdefault((row.kind, row.group_size, row.link, row.num_groups), []).append(row)
    for (kind, group_size, link, num_groups), section in sections.items():
        lines += [f"# {kind}: {num_groups} group(s) of {group_size} devices, {link}-host",
                  "#        size       count    type       time    algbw    busbw",
                  "#         (B)  (elements)               (us)   (GB/s)   (GB/s)"]
        for r in section:
            lines.append(f"{r.num_bytes:>13} {r.num_bytes // _ITEMSIZE:>11}   float "
                         f"{r.time_s * 1e6:>10.1f} {r.algbw_bytes_per_s / 1e9:>8.3f} "
                         f"{r.busbw_bytes_per_s / 1e9:>8.3f}")
        average = sum(r.busbw_bytes_per_s for r in section) / len(section)
        lines += [f"# Avg bus bandwidth    : {average / 1e9:.4g} GB/s", ""]
    return "\n".join(lines).rstrip("\n")


def describe_devices(devices: Sequence | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata pairs for a `ProfileDatabase`: platform, device kind, counts, jax version."""
    devices = list(devices) if devices is not None else jax.devices()
    return (("platform", devices[0].platform), ("device_kind", devices[0].device_kind),
            ("num_devices", str(len(devices))),
            ("num_hosts", str(len({d.process_index for d in devices}))),
            ("jax_version", jax.__version__))


# --------------------------------------------------------------------- internals


def _enumerate_layouts(devices, group_sizes):
    """(mesh, link class) per group size: consecutive groups, plus strided ones if their
    link class differs (they cross hosts when the consecutive ones do not)."""
    layouts = []
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    for g in group_sizes:
        consecutive = grid.reshape(len(devices) // g, g)
        strided = grid.reshape(g, len(devices) // g).T
        seen = set()
        for arrangement in (consecutive, strided):
            link = _link_class(arrangement)
            if link not in seen:
                seen.add(link)
                layouts.append((Mesh(arrangement, _AXES), link))
    return layouts


def _link_class(arrangement) -> str:
    spans = any(len({d.process_index for d in group}) > 1 for group in arrangement)
    return "inter" if spans else "intra"


def _profile_one(kind: str, mesh: Mesh, link: str, size: int, repeats: int, gathers: dict):
    """One row, or None when the size gives a device less than one element per member."""
    num_groups, group_size = mesh.shape["group"], mesh.shape["member"]
    elements = size // _ITEMSIZE
    if kind in ("all-gather", "reduce-scatter", "all-to-all"):
        elements -= elements % group_size
    if elements < (group_size if kind != "all-reduce" and kind != "send-recv" else 1):
        logger.info("skipping %s of %d bytes on groups of %d", kind, size, group_size)
        return None
    in_elements = elements // group_size if kind == "all-gather" else elements
    one, chained, side_by_side = _timings(kind, mesh, in_elements, repeats)
    if kind == "all-gather":
        gathers[(id(mesh), elements)] = chained
    if kind == "reduce-scatter":  # its chain gathers back: take the all-gather's time off
        gather = gathers.get((id(mesh), elements))
        if gather is None:
            gather = _timings("all-gather", mesh, elements // group_size, repeats)[1]
        chained -= gather
    # noise can make a slope of tiny collectives vanish: keep at least a tenth of the time
    # a program of one collective takes
    seconds = max(chained, side_by_side, one / 10)
    return CollectiveRow(kind=kind, group_size=group_size, num_bytes=elements * _ITEMSIZE,
                         time_s=seconds, link=link, num_groups=num_groups)


def _timings(kind: str, mesh: Mesh, in_elements: int, repeats: int
             ) -> tuple[float, float, float]:
    """Seconds of a program of one collective, and per collective inside a program: the
    slope to a chain of `CHAIN`, and to `CHAIN` side by side; on ``in_elements`` float32
    elements per device each."""
    make = jax.jit(lambda i: jnp.full((mesh.shape["group"], mesh.shape["member"], in_elements),
                                      1.0 + i, jnp.float32),
                   out_shardings=NamedSharding(mesh, P(*_AXES, None)))
    inputs = [make(i) for i in range(CHAIN)]
    one = run_timed(_build_collective(kind, mesh, 1), inputs[0], repeats=repeats)
    chain = run_timed(_build_collective(kind, mesh, CHAIN), inputs[0], repeats=repeats)
    side = run_timed(_build_collective(kind, mesh, CHAIN, side_by_side=True), *inputs,
                     repeats=repeats)
    return one, (chain - one) / (CHAIN - 1), (side - one) / (CHAIN - 1)


def _build_collective(kind: str, mesh: Mesh, count: int = 1, side_by_side: bool = False):
    """A jitted shard_map running ``count`` collectives over the ``member`` axis of
    ``mesh``: each on the last one's result (shape-changing ones are brought back to the
    input's shape: an all-gather sliced, a reduce-scatter gathered), or ``side_by_side``,
    one on each of ``count`` inputs."""
    group_size = mesh.shape["member"]

    def once(x, chained: bool):  # x: the local block, shape (1, 1, elements)
        if kind == "all-reduce":
            return jax.lax.psum(x, "member")
        if kind == "all-gather":
            gathered = jax.lax.all_gather(x, "member", axis=2, tiled=True)
            return gathered[..., :x.shape[2]] if chained else gathered
        if kind == "reduce-scatter":
            scattered = jax.lax.psum_scatter(x, "member", scatter_dimension=2, tiled=True)
            return jax.lax.all_gather(scattered, "member", axis=2, tiled=True) if chained \
                else scattered
        if kind == "all-to-all":
            return jax.lax.all_to_all(x, "member", 2, 2, tiled=True)
        ring = [(i, (i + 1) % group_size) for i in range(group_size)]
        return jax.lax.ppermute(x, "member", perm=ring)

    def body(*xs):
        if side_by_side:
            return [once(x, False) for x in xs]
        (x,) = xs
        for _ in range(count):
            x = once(x, count > 1)
        return x

    # check_vma=False: the outputs are declared sharded over "member" even where the
    # collective makes them equal across it (psum, all_gather); the timing is what matters.
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(*_AXES, None),
                                 out_specs=P(*_AXES, None), check_vma=False))
