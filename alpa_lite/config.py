"""Parallelization methods: frozen, hashable, validated when constructed.

`ShardParallel` runs the intra-op ILP; `DataParallel`, `Zero2Parallel` and `Zero3Parallel` are
the same machinery with a restricted strategy set. `PipeshardParallel` (inter-op + intra-op)
lives in `alpa_lite.pipeline_config`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from alpa_lite.errors import InvalidConfigError
from alpa_lite.intra_op.problem import SpecPolicy

SOLVERS = ("auto", "highs", "cbc")


def _check_positive_int(name: str, value, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidConfigError(
            f"{name} must be a positive integer; got {value!r}. For example {name}=4."
        )


def _check_mesh_shape(mesh_shape) -> tuple[int, ...] | None:
    if mesh_shape is None:
        return None
    shape = tuple(mesh_shape) if isinstance(mesh_shape, (tuple, list)) else (mesh_shape,)
    if not 1 <= len(shape) <= 2 or any(
            not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
        raise InvalidConfigError(
            f"mesh_shape must be 1 or 2 positive integers; got {mesh_shape!r}. "
            "Use e.g. mesh_shape=(8,) or mesh_shape=(2, 4)."
        )
    return shape


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardParallel:
    """Intra-operator parallelism planned by the sharding ILP (Alpa's ShardParallel).

    Attributes:
        mesh_shape: logical mesh, e.g. ``(2, 4)``; default: all devices on one axis.
        mesh_alpha: per-axis collective latency (seconds or abstract units).
        mesh_beta: per-axis inverse bandwidth (seconds per byte or abstract units).
        devices: the devices to use (default: the first ``prod(mesh_shape)`` of jax.devices()).
        num_micro_batches: gradient accumulation over this many micro-batches (needs
            `alpa_lite.grad` / `alpa_lite.value_and_grad` in the step).
        memory_budget_per_device: bytes; the plan's peak memory must fit.
        strict: raise `UnsupportedPrimitiveError` instead of replicating unknown primitives.
        solver: ``"auto"`` (HiGHS if highspy is installed, else CBC), ``"highs"`` or ``"cbc"``.
        solver_time_limit_s: ILP time limit; the best plan found so far is used after it.
        share_repeated_layers: give every repeat of a layer (flax modules ``block_0`` ...
            ``block_N``) the same sharding, which shrinks the ILP by about the number of
            layers. None: automatic (on for large graphs), True/False: always/never.

    Example:
        >>> ShardParallel(mesh_shape=(2, 4), mesh_alpha=(1.0, 1.0), mesh_beta=(1.0, 0.1)).mesh_shape
        (2, 4)
    """

    mesh_shape: tuple[int, ...] | None = None
    mesh_alpha: tuple[float, ...] | None = None
    mesh_beta: tuple[float, ...] | None = None
    devices: tuple | None = None
    num_micro_batches: int | None = None
    memory_budget_per_device: float | None = None
    strict: bool = False
    solver: str = "auto"
    solver_time_limit_s: float = 60.0
    share_repeated_layers: bool | None = None

    policy: ClassVar[SpecPolicy] = SpecPolicy.AUTO

    def __post_init__(self):
        object.__setattr__(self, "mesh_shape", _check_mesh_shape(self.mesh_shape))
        for name in ("mesh_alpha", "mesh_beta"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
                if any(not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v)
                       for v in value):
                    raise InvalidConfigError(
                        f"{name} must be non-negative finite numbers, one per mesh axis; "
                        f"got {getattr(self, name)!r}.")
                object.__setattr__(self, name, tuple(float(v) for v in value))
        _check_positive_int("num_micro_batches", self.num_micro_batches)
        if self.memory_budget_per_device is not None and not self.memory_budget_per_device > 0:
            raise InvalidConfigError(
                f"memory_budget_per_device must be a positive number of bytes; got "
                f"{self.memory_budget_per_device!r}. For example memory_budget_per_device=2**30.")
        if self.solver not in SOLVERS:
            raise InvalidConfigError(
                f"solver must be one of {SOLVERS}; got {self.solver!r}.")
        if not self.solver_time_limit_s > 0:
            raise InvalidConfigError(
                f"solver_time_limit_s must be positive; got {self.solver_time_limit_s!r}.")
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def micro_batches(self) -> int:
        return self.num_micro_batches or 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataParallel(ShardParallel):
    """Pure data parallelism: the batch is split over every device, the rest replicated."""

    policy: ClassVar[SpecPolicy] = SpecPolicy.DATA


@dataclasses.dataclass(frozen=True, kw_only=True)
class Zero2Parallel(ShardParallel):
    """ZeRO stage 2: data parallel, with gradients reduce-scattered and optimizer state sharded."""

    policy: ClassVar[SpecPolicy] = SpecPolicy.ZERO2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Zero3Parallel(ShardParallel):
    """ZeRO stage 3: ZeRO-2 plus sharded parameters, gathered where they are used."""

    policy: ClassVar[SpecPolicy] = SpecPolicy.ZERO3
