"""Logical device meshes: axis sizes, names and a per-axis alpha-beta link model.

A `LogicalMesh` is what the planner sees of a cluster: a 1-D or 2-D grid of devices where a
collective along mesh axis ``i`` costs ``alpha[i] + beta[i] * bytes * factor`` seconds
(Alpa, OSDI'22, section 4; nccl-tests bus-bandwidth factors). It holds numbers only; the jax
`Mesh` is built from it at emit time.
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
        peak_flops_per_s: peak dense flop/s of one device (used for compute-time estimates).
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
