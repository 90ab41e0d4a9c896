"""Logical device meshes: axis sizes, names, a per-axis alpha-beta link model, a roofline.

A `LogicalMesh` is what the planner sees of a cluster: a 1-D or 2-D grid of devices where a
collective along mesh axis ``i`` costs ``alpha[i] + beta[i] * bytes * factor`` seconds
(Alpa, OSDI'22, section 4; nccl-tests bus-bandwidth factors), and where one operator costs
``max(flops / peak[dtype], hbm_bytes / memory_bandwidth)`` seconds (the roofline model,
Williams et al. 2009). It holds numbers only; the jax `Mesh` is built from it at emit time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from alpa_lite.errors import InvalidConfigError

if TYPE_CHECKING:
    from alpa_lite.profiling.database import ProfileDatabase

DEFAULT_AXIS_NAMES = ("x", "y")
LINK_CLASSES = ("intra", "inter")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogicalMesh:
    """A logical view of a set of devices.

    Attributes:
        shape: devices along each mesh axis, e.g. ``(2, 4)``.
        axis_names: one name per mesh axis.
        alpha_s: latency per collective along each mesh axis, in seconds (or abstract units).
        beta_s_per_byte: inverse bandwidth along each mesh axis, in seconds per byte.
        memory_per_device_bytes: device memory, or None when unknown/unlimited.
        peak_flops_per_s: peak dense flop/s of one device for dtypes that
            ``peak_flops_by_dtype`` does not list.
        peak_flops_by_dtype: ``((dtype name, flop/s), ...)`` per-dtype peaks of one device
            (a dict is accepted and turned into sorted pairs so the mesh stays hashable).
        memory_bandwidth_bytes_per_s: achievable memory bandwidth of one device, or None
            when unknown (then `compute_time_s` prices flops only, unless ``profile`` has a
            measured bandwidth).
        launch_latency_s: fixed cost of launching one program on this mesh, in seconds.
        op_latency_s: fixed cost of each unfused operator (kernel) in a program, in seconds:
            the per-kernel floor of the device model.
        matmul_efficiency: the fraction of the dtype's peak that large matmuls and
            convolutions reach (a GPU's cuBLAS GEMMs reach 0.75-0.9 of the datasheet figure);
            a profile's measured matmul rows replace it.
        vector_flops_per_s: flop/s of operators that are not matmuls (elementwise, reductions:
            the GPU's CUDA cores, not its tensor cores), or None to price them at the dtype's
            peak like matmuls.
        profile: measured collective times (`alpa_lite.profiling.ProfileDatabase`); when set,
            `estimate_collective_s` interpolates them instead of using alpha/beta.
        axis_links: link class of each mesh axis, ``"intra"`` (within a host) or ``"inter"``
            (across hosts); it picks the profile's rows. Empty means every axis is ``"intra"``.

    Example:
        >>> mesh = LogicalMesh(shape=(2, 4), alpha_s=(1.0, 1.0), beta_s_per_byte=(1.0, 0.1))
        >>> mesh.num_devices, mesh.axis_size("y")
        (8, 4)
    """

    shape: tuple[int, ...]
    axis_names: tuple[str, ...] = DEFAULT_AXIS_NAMES
    alpha_s: tuple[float, ...] = (1.0, 1.0)
    beta_s_per_byte: tuple[float, ...] = (1.0, 1.0)
    memory_per_device_bytes: float | None = None
    peak_flops_per_s: float = 1e12
    profile: "ProfileDatabase | None" = None
    axis_links: tuple[str, ...] = ()
    peak_flops_by_dtype: tuple[tuple[str, float], ...] = ()
    memory_bandwidth_bytes_per_s: float | None = None
    launch_latency_s: float = 0.0
    op_latency_s: float = 0.0
    matmul_efficiency: float = 1.0
    vector_flops_per_s: float | None = None

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if not 1 <= len(shape) <= 2 or any(s < 1 for s in shape):
            raise InvalidConfigError(
                f"A logical mesh must have 1 or 2 axes of positive size; got shape {self.shape}. "
                "Use e.g. mesh_shape=(8,) or mesh_shape=(2, 4)."
            )
        object.__setattr__(self, "shape", shape)
        names = tuple(self.axis_names)[: len(shape)]
        alpha = _per_axis(self.alpha_s, len(shape), "mesh_alpha")
        beta = _per_axis(self.beta_s_per_byte, len(shape), "mesh_beta")
        if len(names) != len(shape) or len(set(names)) != len(names):
            raise InvalidConfigError(
                f"Need {len(shape)} distinct axis names for mesh shape {shape}; got {self.axis_names}."
            )
        object.__setattr__(self, "axis_names", names)
        object.__setattr__(self, "alpha_s", alpha)
        object.__setattr__(self, "beta_s_per_byte", beta)
        if self.memory_per_device_bytes is not None and self.memory_per_device_bytes <= 0:
            raise InvalidConfigError(
                f"memory_per_device_bytes must be positive; got {self.memory_per_device_bytes}."
            )
        object.__setattr__(self, "axis_links", _axis_links(self.axis_links, len(shape)))
        check_rate(self.peak_flops_per_s, "peak_flops_per_s", "19.5e12")
        object.__setattr__(self, "peak_flops_by_dtype", _dtype_pairs(self.peak_flops_by_dtype))
        if self.memory_bandwidth_bytes_per_s is not None:
            check_rate(self.memory_bandwidth_bytes_per_s, "memory_bandwidth_bytes_per_s",
                        "2.0e12")
            object.__setattr__(self, "memory_bandwidth_bytes_per_s",
                               float(self.memory_bandwidth_bytes_per_s))
        for name in ("launch_latency_s", "op_latency_s"):
            check_seconds(getattr(self, name), name, "1e-5")
            object.__setattr__(self, name, float(getattr(self, name)))
        check_fraction(self.matmul_efficiency, "matmul_efficiency", "0.8")
        if self.vector_flops_per_s is not None:
            check_rate(self.vector_flops_per_s, "vector_flops_per_s", "19.5e12")

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    @property
    def sharding_axes(self) -> tuple[str, ...]:
        """Mesh axes of size > 1: the only ones a sharding can usefully use."""
        return tuple(n for n, s in zip(self.axis_names, self.shape) if s > 1)

    def axis_size(self, axis: str) -> int:
        return self.shape[self.axis_names.index(axis)]

    def axes_size(self, axes) -> int:
        return math.prod(self.axis_size(a) for a in axes)

    def link(self, axes) -> tuple[float, float]:
        """(alpha, beta) of a collective spanning ``axes``: the slowest link bounds it."""
        idx = [self.axis_names.index(a) for a in axes]
        return max(self.alpha_s[i] for i in idx), max(self.beta_s_per_byte[i] for i in idx)

    def link_class(self, axes) -> str:
        """``"inter"`` if any of ``axes`` spans hosts, else ``"intra"`` (profile row lookup)."""
        links = self.axis_links or ("intra",) * len(self.shape)
        return "inter" if any(links[self.axis_names.index(a)] == "inter" for a in axes) else "intra"

    def flops_per_s(self, dtype: str, flops: float = 0.0, matmul: bool = True) -> float:
        """Flop/s one device reaches on an operator of ``flops`` flops in ``dtype``.

        Matmuls (``matmul=True``): the profile's measured matmul throughput at that size when
        it has rows for ``dtype`` (`ProfileDatabase.matmul_flops_per_s`), else the dtype's peak
        from ``peak_flops_by_dtype`` (else ``peak_flops_per_s``) times ``matmul_efficiency``.
        Other operators: ``vector_flops_per_s`` when set, else as a matmul.

        Example:
            >>> mesh = LogicalMesh(shape=(2,), peak_flops_per_s=1e12, matmul_efficiency=0.5,
            ...                    peak_flops_by_dtype={"bfloat16": 2e12},
            ...                    vector_flops_per_s=1e11)
            >>> mesh.flops_per_s("bfloat16"), mesh.flops_per_s("int32", matmul=False)
            (1000000000000.0, 100000000000.0)
        """
        if not matmul and self.vector_flops_per_s is not None:
            return self.vector_flops_per_s
        name = str(dtype)
        if self.profile is not None and name in self.profile.matmul_dtypes:
            return self.profile.matmul_flops_per_s(name, flops)
        peak = dict(self.peak_flops_by_dtype).get(name, self.peak_flops_per_s)
        return peak * self.matmul_efficiency

    @property
    def effective_memory_bandwidth_bytes_per_s(self) -> float | None:
        """``memory_bandwidth_bytes_per_s``, else the profile's measured bandwidth, else None."""
        if self.memory_bandwidth_bytes_per_s is not None:
            return self.memory_bandwidth_bytes_per_s
        if self.profile is not None:
            return self.profile.memory_bandwidth_bytes_per_s()
        return None

    def compute_time_s(self, flops: float, hbm_bytes: float = 0.0,
                       dtype: str = "float32", matmul: bool = True) -> float:
        """Roofline seconds of one operator on one device.

        ``t = max(flops / F(dtype, flops), hbm_bytes / W)`` where ``F`` is `flops_per_s`
        (measured matmul throughput, else the dtype's peak times ``matmul_efficiency``; the
        vector rate for ``matmul=False``) and ``W`` the (achievable) memory bandwidth;
        the second term is left out when the bandwidth is unknown, which gives the plain
        ``flops / peak`` estimate.

        Args:
            flops: floating-point operations of the operator (on this device).
            hbm_bytes: bytes it reads and writes in device memory (on this device).
            dtype: the dtype it computes in, e.g. ``"bfloat16"``.

        Example:
            >>> mesh = LogicalMesh(shape=(2,), peak_flops_per_s=1e12,
            ...                    memory_bandwidth_bytes_per_s=1e11)
            >>> mesh.compute_time_s(1e12, 1e9), mesh.compute_time_s(1e9, 1e12)
            (1.0, 10.0)
        """
        flop_s = float(flops) / self.flops_per_s(dtype, flops, matmul) if flops > 0 else 0.0
        bandwidth = self.effective_memory_bandwidth_bytes_per_s
        if bandwidth is None or hbm_bytes <= 0:
            return flop_s
        return max(flop_s, float(hbm_bytes) / bandwidth)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["profile"] = None if self.profile is None else self.profile.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LogicalMesh":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        if isinstance(kw.get("profile"), dict):
            from alpa_lite.profiling.database import ProfileDatabase  # mesh stays import-light

            kw["profile"] = ProfileDatabase.from_dict(kw["profile"])
        return cls(**kw)


def check_seconds(value, name: str, example: str) -> None:
    """A fixed cost in seconds: a finite number >= 0 (0 ignores it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise InvalidConfigError(
            f"{name} must be a finite number of seconds >= 0; got {value!r}. Use e.g. "
            f"{name}={example}, or 0 to ignore it.")


def check_fraction(value, name: str, example: str) -> None:
    """An efficiency: a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InvalidConfigError(
            f"{name} must be a fraction in (0, 1]; got {value!r}. Use e.g. {name}={example} "
            "(1 for the datasheet figure).")


def check_rate(value, name: str, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise InvalidConfigError(
            f"{name} must be a positive finite rate; got {value!r}. Use e.g. {name}={example}.")


def _dtype_pairs(peaks) -> tuple[tuple[str, float], ...]:
    """``{dtype: flop/s}`` or pairs (also JSON lists of lists) -> sorted ``(str, float)`` pairs."""
    items = peaks.items() if isinstance(peaks, dict) else peaks
    pairs = []
    for item in items:
        if len(item) != 2:
            raise InvalidConfigError(
                f"peak_flops_by_dtype needs (dtype name, flop/s) pairs; got {item!r} in "
                f"{peaks!r}. Use e.g. {{'float32': 19.5e12, 'bfloat16': 312e12}}.")
        name, value = item
        check_rate(value, f"peak_flops_by_dtype[{name!r}]", "312e12")
        pairs.append((str(name), float(value)))
    return tuple(sorted(pairs))


def _axis_links(links, ndim: int) -> tuple[str, ...]:
    links = tuple(links)
    if not links:
        return ()
    if len(links) < ndim or any(link not in LINK_CLASSES for link in links[:ndim]):
        raise InvalidConfigError(
            f"axis_links needs one of {list(LINK_CLASSES)} per mesh axis ({ndim}); got {links}. "
            "Leave it empty to treat every axis as within one host.")
    return links[:ndim]


def _per_axis(values, ndim: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in (values if isinstance(values, (tuple, list)) else [values]))
    if len(values) < ndim:
        raise InvalidConfigError(
            f"{name} needs one value per mesh axis ({ndim}); got {values}."
        )
    values = values[:ndim]
    if any(v < 0 or not math.isfinite(v) for v in values):
        raise InvalidConfigError(f"{name} values must be finite and >= 0; got {values}.")
    return values


# --- specs: per tensor dim, the mesh axes that split it (major first) ---

Spec = tuple[tuple[str, ...], ...]


def replicated_spec(rank: int) -> Spec:
    return ((),) * rank


def spec_shards(spec: Spec, mesh: LogicalMesh) -> int:
    """How many pieces a tensor with ``spec`` is cut into."""
    return math.prod(mesh.axes_size(axes) for axes in spec)


def format_spec(spec: Spec | None) -> str:
    """``(("x",), (), ("x","y"))`` -> ``"[x,-,xy]"``."""
    if spec is None:
        return "*"
    return "[" + ",".join("".join(axes) or "-" for axes in spec) + "]"
