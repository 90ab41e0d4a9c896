"""The profile database: measured collective, matmul, launch and memory timings.

Input: rows measured by `alpa_lite.profiling.comm` / `compute` (or loaded from JSON). Output:
``collective_time_s(kind, group_size, num_bytes, link)``, ``matmul_flops_per_s(dtype,
flops)``, ``launch_latency_s(num_devices)`` and ``memory_bandwidth_bytes_per_s()`` for the
cost model, and an alpha-beta fit per link class for `ClusterSpec`.

Sizes follow nccl-tests: ``num_bytes`` is the per-device buffer of the collective (all-reduce:
the buffer reduced; all-gather: the gathered result; reduce-scatter: the input before
scattering; all-to-all: the whole send buffer; send-recv: the bytes each device sends), which
is the ``B`` of `alpa_lite.cost.collectives`. Bus bandwidth is ``algbw * factor(n)`` with
``factor = 2(n-1)/n`` (all-reduce), ``(n-1)/n`` (all-gather, reduce-scatter, all-to-all) and 1
(send-recv); it is comparable across group sizes, which is what the nearest-group fallback uses.

The database is frozen and hashable (rows are tuples) because a `LogicalMesh` that carries it
is a cache key. This module imports neither jax nor numpy.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
from typing import Iterable, Literal

from alpa_lite.errors import InvalidConfigError

CollectiveKind = Literal["all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send-recv"]
LinkClass = Literal["intra", "inter"]

COLLECTIVE_KINDS: tuple[str, ...] = (
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send-recv")
LINK_CLASSES: tuple[str, ...] = ("intra", "inter")
PROFILE_FORMAT_VERSION = 1


def bus_bandwidth_factor(kind: str, group_size: int) -> float:
    """busbw / algbw for a collective over ``group_size`` devices (nccl-tests conventions).

    Example:
        >>> bus_bandwidth_factor("all-reduce", 8), bus_bandwidth_factor("all-gather", 4)
        (1.75, 0.75)
    """
    _check_choice(kind, COLLECTIVE_KINDS, "collective kind")
    n = int(group_size)
    if kind == "send-recv":
        return 1.0
    if n <= 1:
        return 0.0
    if kind == "all-reduce":
        return 2.0 * (n - 1) / n
    return (n - 1) / n


@dataclasses.dataclass(frozen=True, kw_only=True)
class CollectiveRow:
    """One measured collective.

    Attributes:
        kind: one of `COLLECTIVE_KINDS`.
        group_size: devices in each group (a mesh axis of this size).
        num_bytes: per-device buffer size in the nccl-tests convention (see module docstring).
        time_s: median wall time of one collective, seconds.
        link: ``"intra"`` if every group lies within one host, else ``"inter"``.
        num_groups: how many groups ran the collective at the same time.
    """

    kind: CollectiveKind
    group_size: int
    num_bytes: int
    time_s: float
    link: LinkClass = "intra"
    num_groups: int = 1

    def __post_init__(self):
        _check_choice(self.kind, COLLECTIVE_KINDS, "collective kind")
        _check_choice(self.link, LINK_CLASSES, "link class")
        _check_positive(self.group_size, "group_size")
        _check_positive(self.num_bytes, "num_bytes")
        _check_positive(self.time_s, "time_s")
        _check_positive(self.num_groups, "num_groups")

    @property
    def algbw_bytes_per_s(self) -> float:
        """Algorithm bandwidth: ``num_bytes / time_s``."""
        return self.num_bytes / self.time_s

    @property
    def busbw_bytes_per_s(self) -> float:
        """Bus bandwidth: algbw times the kind's bus factor (comparable across group sizes)."""
        return self.algbw_bytes_per_s * bus_bandwidth_factor(self.kind, self.group_size)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatmulRow:
    """One measured ``(m, k) @ (k, n)`` matmul on one device (``2 m n k`` flops)."""

    dtype: str
    m: int
    n: int
    k: int
    time_s: float

    def __post_init__(self):
        for name in ("m", "n", "k", "time_s"):
            _check_positive(getattr(self, name), name)

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.time_s


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchRow:
    """A fixed cost measured on ``num_devices`` devices.

    ``kind="program"``: the median wall time of launching a trivial jitted program (``x + 1``
    on a tiny array, sharded over the devices when there are several): the fixed cost every
    program pays (Python dispatch, the runtime's launch, the wait for completion).
    ``kind="operator"``: the extra time per operator (kernel) inside a program, from a chain
    of tiny matmuls (the slope between a short and a long chain): what each unfused operator
    costs beyond its flops and bytes (on CPU, the devices' kernels share the host's cores).
    """

    num_devices: int
    time_s: float
    kind: str = "program"

    def __post_init__(self):
        _check_positive(self.num_devices, "num_devices")
        _check_positive(self.time_s, "time_s")
        _check_choice(self.kind, ("program", "operator"), "LaunchRow.kind")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryBandwidthRow:
    """One measured elementwise pass over device memory (``y = 2 * x`` on one device).

    Attributes:
        num_bytes: bytes read plus bytes written (twice the array size).
        time_s: median seconds of one pass.
    """

    num_bytes: int
    time_s: float

    def __post_init__(self):
        _check_positive(self.num_bytes, "num_bytes")
        _check_positive(self.time_s, "time_s")

    @property
    def bytes_per_s(self) -> float:
        return self.num_bytes / self.time_s


@dataclasses.dataclass(frozen=True, kw_only=True, eq=True)
class ProfileDatabase:
    """Measured timings of one cluster, queried by the cost model.

    Attributes:
        collectives: measured collectives (any kinds, group sizes, link classes).
        matmuls: measured matmuls (any dtypes and sizes).
        launches: launch latency of a trivial program, per number of devices it spans.
        memory_bandwidths: measured elementwise passes over one device's memory.
        metadata: ``(key, value)`` string pairs (device kind, jax version, ...).

    Example:
        >>> db = ProfileDatabase(collectives=(
        ...     CollectiveRow(kind="all-reduce", group_size=4, num_bytes=1000, time_s=1e-5),
        ...     CollectiveRow(kind="all-reduce", group_size=4, num_bytes=3000, time_s=3e-5)))
        >>> round(db.collective_time_s("all-reduce", 4, 2000) * 1e6, 6)
        20.0
    """

    collectives: tuple[CollectiveRow, ...] = ()
    matmuls: tuple[MatmulRow, ...] = ()
    launches: tuple[LaunchRow, ...] = ()
    memory_bandwidths: tuple[MemoryBandwidthRow, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        collectives = tuple(sorted(self.collectives, key=lambda r: (
            r.kind, r.link, r.group_size, r.num_bytes, r.time_s)))
        matmuls = tuple(sorted(self.matmuls, key=lambda r: (r.dtype, r.flops, r.time_s)))
        metadata = tuple(sorted((str(k), str(v)) for k, v in (
            self.metadata.items() if isinstance(self.metadata, dict) else self.metadata)))
        object.__setattr__(self, "collectives", collectives)
        object.__setattr__(self, "matmuls", matmuls)
        object.__setattr__(self, "metadata", metadata)
        launches = tuple(sorted(self.launches, key=lambda r: (r.kind, r.num_devices, r.time_s)))
        bandwidths = tuple(sorted(self.memory_bandwidths, key=lambda r: (r.num_bytes, r.time_s)))
        object.__setattr__(self, "launches", launches)
        object.__setattr__(self, "memory_bandwidths", bandwidths)
        # Derived lookup tables and the hash are computed once: the database is immutable,
        # and the planner hashes meshes (which carry it) on every cached strategy lookup.
        object.__setattr__(self, "_curves", _build_curves(collectives))
        object.__setattr__(self, "_hash", hash((collectives, matmuls, launches, bandwidths, metadata)))

    def __hash__(self) -> int:
        return self._hash

    # ----------------------------------------------------------------- queries

    def has_link(self, link: str) -> bool:
        """Whether any collective was measured on this link class."""
        return any(key[1] == link for key in self._curves)

    def group_sizes(self, kind: str, link: str = "intra") -> tuple[int, ...]:
        """Measured group sizes of one kind on one link class, ascending."""
        return tuple(sorted(g for (k, lk, g) in self._curves if k == kind and lk == link))

    def collective_time_s(self, kind: CollectiveKind, group_size: int, num_bytes: float,
                          link: LinkClass = "intra") -> float:
        """Predicted seconds of one collective, from the measurements.

        Lookup order:

        1. rows of this kind, link and group size: piecewise-linear in bytes between measured
           sizes (exact at them); below the smallest size, the smallest size's time (latency
           bound); above the largest, ``t_last * num_bytes / bytes_last`` (its algbw);
        2. else the measured group size of this kind and link nearest in ``log(n)`` (ties: the
           larger), queried at equal *bus* bytes ``num_bytes * factor(n) / factor(n')``;
        3. else the alpha-beta fit of the link over every kind: ``alpha + beta * factor(n) * B``.

        Args:
            kind: one of `COLLECTIVE_KINDS`.
            group_size: devices in the group; groups of 1 cost nothing (except send-recv).
            num_bytes: per-device buffer size (nccl-tests convention).
            link: ``"intra"`` or ``"inter"``.

        Raises:
            InvalidConfigError: if nothing was measured on ``link`` (check `has_link`).
        """
        _check_choice(kind, COLLECTIVE_KINDS, "collective kind")
        _check_choice(link, LINK_CLASSES, "link class")
        n = int(group_size)
        if n <= 1 and kind != "send-recv":
            return 0.0
        curve = self._curves.get((kind, link, n))
        if curve is not None:
            return _interpolate_bytes(curve, float(num_bytes))
        sizes = self.group_sizes(kind, link)
        if sizes:
            nearest = min(sizes, key=lambda g: (abs(math.log(g / max(n, 1))), -g))
            scale = _safe_ratio(bus_bandwidth_factor(kind, n), bus_bandwidth_factor(kind, nearest))
            return _interpolate_bytes(self._curves[(kind, link, nearest)], num_bytes * scale)
        alpha, beta = self.fit_alpha_beta(link)
        return alpha + beta * bus_bandwidth_factor(kind, n) * float(num_bytes)

    def fit_alpha_beta(self, link: LinkClass = "intra") -> tuple[float, float]:
        """``(alpha_s, beta_s_per_byte)`` of ``t = alpha + beta * bus_bytes`` on one link class.

        ``bus_bytes = num_bytes * factor(kind, n)`` puts every kind and group size on one
        line. The fit minimises the squared *relative* error so that small (latency-bound) and
        large (bandwidth-bound) messages both count; a negative intercept is clipped to 0.

        Raises:
            InvalidConfigError: if ``link`` has fewer than one usable measurement.
        """
        _check_choice(link, LINK_CLASSES, "link class")
        points = [(r.num_bytes * bus_bandwidth_factor(r.kind, r.group_size), r.time_s)
                  for r in self.collectives if r.link == link
                  and bus_bandwidth_factor(r.kind, r.group_size) > 0]
        if not points:
            raise InvalidConfigError(
                f"The profile has no collective measured on the {link!r} link (it has "
                f"{sorted({r.link for r in self.collectives}) or 'none'}). Profile a device "
                f"group that is {'within one host' if link == 'intra' else 'across hosts'}, "
                "or give the link's alpha/beta by hand.")
        return _fit_relative(points)

    def matmul_flops_per_s(self, dtype: str, flops: float) -> float:
        """Achieved flop/s of a matmul with ``flops`` flops, interpolated in ``log(flops)``.

        Below the smallest measured matmul the smallest one's throughput is used, above the
        largest the largest one's (throughput saturates).

        Raises:
            InvalidConfigError: if ``dtype`` was not measured.
        """
        rows = [r for r in self.matmuls if r.dtype == dtype]
        if not rows:
            raise InvalidConfigError(
                f"No matmul throughput measured for dtype {dtype!r}; measured dtypes: "
                f"{list(self.matmul_dtypes) or 'none'}. Run `alpa-lite profile compute --dtypes "
                f"{dtype}` or ask for a measured dtype.")
        points = _merge_points((math.log(r.flops), r.flops_per_s) for r in rows)
        return _interpolate_clamped(points, math.log(max(float(flops), 1.0)))

    @property
    def matmul_dtypes(self) -> tuple[str, ...]:
        return tuple(sorted({r.dtype for r in self.matmuls}))

    def launch_latency_s(self, num_devices: int = 1) -> float | None:
        """Measured launch latency of a program on ``num_devices`` devices.

        Interpolated linearly in the device count between the measured counts (clamped to
        the nearest one outside them); None when nothing was measured. Several rows of one
        count are averaged.

        Example:
            >>> db = ProfileDatabase(launches=(LaunchRow(num_devices=1, time_s=2e-5),
            ...                                LaunchRow(num_devices=8, time_s=9e-5)))
            >>> db.launch_latency_s(8), db.launch_latency_s(4), ProfileDatabase().launch_latency_s()
            (9e-05, 5e-05, None)
        """
        return self._fixed_cost_s("program", num_devices)

    def op_latency_s(self, num_devices: int = 1) -> float | None:
        """Measured extra seconds per operator of a program on ``num_devices`` devices
        (interpolated like `launch_latency_s`), or None."""
        return self._fixed_cost_s("operator", num_devices)

    def _fixed_cost_s(self, kind: str, num_devices: int) -> float | None:
        by_count: dict[int, list[float]] = {}
        for row in self.launches:
            if row.kind == kind:
                by_count.setdefault(row.num_devices, []).append(row.time_s)
        if by_count:
            points = sorted((n, sum(t) / len(t)) for n, t in by_count.items())
            return _interpolate_clamped(points, float(num_devices))
        return None

    def memory_bandwidth_bytes_per_s(self) -> float | None:
        """Achieved memory bandwidth of one device, or None when not measured.

        The largest measured pass is used: smaller ones may run from cache and overstate
        the bandwidth of device memory.
        """
        if not self.memory_bandwidths:
            return None
        largest = max(r.num_bytes for r in self.memory_bandwidths)
        rows = [r for r in self.memory_bandwidths if r.num_bytes == largest]
        return sum(r.bytes_per_s for r in rows) / len(rows)

    # ------------------------------------------------------------- building

    def replace(self, **changes) -> "ProfileDatabase":
        """A copy with some fields replaced (e.g. new ``collectives`` after a re-profile)."""
        fields = {"collectives": self.collectives, "matmuls": self.matmuls,
                  "launches": self.launches, "memory_bandwidths": self.memory_bandwidths,
                  "metadata": self.metadata}
        fields.update(changes)
        return ProfileDatabase(**fields)

    # ----------------------------------------------------------------- JSON

    def to_dict(self) -> dict:
        return {
            "format_version": PROFILE_FORMAT_VERSION,
            "metadata": dict(self.metadata),
            "collectives": [dataclasses.asdict(r) for r in self.collectives],
            "matmuls": [dataclasses.asdict(r) for r in self.matmuls],
            "launches": [dataclasses.asdict(r) for r in self.launches],
            "memory_bandwidths": [dataclasses.asdict(r) for r in self.memory_bandwidths],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ProfileDatabase":
        version = data.get("format_version")
        if version != PROFILE_FORMAT_VERSION:
            raise InvalidConfigError(
                f"Profile database format_version {version!r} is not supported (expected "
                f"{PROFILE_FORMAT_VERSION}). Re-run `alpa-lite profile comm --out FILE`.")
        try:
            collectives = tuple(CollectiveRow(**row) for row in data.get("collectives", ()))
            matmuls = tuple(MatmulRow(**row) for row in data.get("matmuls", ()))
            # launches and memory_bandwidths are newer sections: older files lack them
            launches = tuple(LaunchRow(**row) for row in data.get("launches", ()))
            bandwidths = tuple(MemoryBandwidthRow(**row)
                               for row in data.get("memory_bandwidths", ()))
        except TypeError as err:
            raise InvalidConfigError(
                f"A profile database row has unexpected or missing fields: {err}. Expected "
                f"collective rows with {[f.name for f in dataclasses.fields(CollectiveRow)]}, "
                f"matmul rows with {[f.name for f in dataclasses.fields(MatmulRow)]}, launch "
                f"rows with {[f.name for f in dataclasses.fields(LaunchRow)]} and memory rows "
                f"with {[f.name for f in dataclasses.fields(MemoryBandwidthRow)]}."
            ) from err
        return cls(collectives=collectives, matmuls=matmuls, launches=launches,
                   memory_bandwidths=bandwidths, metadata=tuple(data.get("metadata", {}).items()))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ProfileDatabase":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProfileDatabase":
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError as err:
            raise InvalidConfigError(
                f"Profile database {os.fspath(path)!r} does not exist. Create one with "
                f"`alpa-lite profile comm --out {os.fspath(path)}`.") from err
        try:
            return cls.from_json(text)
        except json.JSONDecodeError as err:
            raise InvalidConfigError(
                f"{os.fspath(path)!r} is not a JSON profile database ({err}).") from err


# ------------------------------------------------------------------ helpers


def _build_curves(rows: Iterable[CollectiveRow]) -> dict:
    """``(kind, link, group_size) -> ((bytes, seconds), ...)`` sorted by bytes, repeats averaged."""
    grouped: dict[tuple, list] = {}
    for r in rows:
        grouped.setdefault((r.kind, r.link, r.group_size), []).append((r.num_bytes, r.time_s))
    return {key: _merge_points(points) for key, points in grouped.items()}


def _merge_points(points) -> tuple[tuple[float, float], ...]:
    """Sorted by x; points with equal x are averaged (several group layouts of one size)."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(float(x), []).append(float(y))
    return tuple((x, sum(ys) / len(ys)) for x, ys in sorted(by_x.items()))


def _interpolate_bytes(curve, num_bytes: float) -> float:
    """Piecewise-linear in bytes; latency floor below, last algbw above (see collective_time_s)."""
    xs = [x for x, _ in curve]
    if num_bytes <= xs[0]:
        return curve[0][1]
    if num_bytes >= xs[-1]:
        last_bytes, last_s = curve[-1]
        return last_s * num_bytes / last_bytes
    return _interpolate_clamped(curve, num_bytes)


def _interpolate_clamped(points, x: float) -> float:
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        return points[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _fit_relative(points) -> tuple[float, float]:
    """Weighted least squares of ``t = a + b x`` with weights ``1/t^2``; a >= 0, b > 0."""
    weights = [1.0 / (t * t) for _, t in points]
    s_w = sum(weights)
    s_x = sum(w * x for w, (x, _) in zip(weights, points))
    s_y = sum(w * t for w, (_, t) in zip(weights, points))
    s_xx = sum(w * x * x for w, (x, _) in zip(weights, points))
    s_xy = sum(w * x * t for w, (x, t) in zip(weights, points))
    det = s_w * s_xx - s_x * s_x
    if det > 0:
        alpha = (s_xx * s_y - s_x * s_xy) / det
        beta = (s_w * s_xy - s_x * s_y) / det
        if alpha >= 0 and beta > 0:
            return alpha, beta
    # Degenerate or unphysical: a line through the origin (pure bandwidth), else pure latency.
    if s_xx > 0 and s_xy > 0:
        return 0.0, s_xy / s_xx
    return min(t for _, t in points), 0.0


def _safe_ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 1.0


def _check_choice(value, choices, what: str) -> None:
    if value not in choices:
        raise InvalidConfigError(f"Unknown {what} {value!r}; expected one of {list(choices)}.")


def _check_positive(value, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InvalidConfigError(f"{name} must be a positive finite number; got {value!r}.")
