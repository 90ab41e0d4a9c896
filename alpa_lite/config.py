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
from alpa_lite.pipeline_model.schedules import ScheduleKind

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
        layer_option: optional `AutoLayerOption` / `ManualLayerOption` (or ``"manual"``) that
            marks layers in the loss function (needs `alpa_lite.grad`); with
            ``remat_layer=True`` each layer's forward is recomputed in the backward pass;
            with ``"auto"`` the fewest leading layers are, that make the plan fit the memory
            budget (``memory_budget_per_device``, default then: the device's memory).

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
    layer_option: object = None

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
        layer = ManualLayerOption() if self.layer_option == "manual" else self.layer_option
        if layer is not None and not isinstance(layer, (AutoLayerOption, ManualLayerOption)):
            raise InvalidConfigError(
                f"layer_option must be None, AutoLayerOption(layer_num=...), ManualLayerOption() "
                f"or 'manual'; got {self.layer_option!r}.")
        object.__setattr__(self, "layer_option", layer)

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


# --- inter-op (pipeline) options ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoLayerOption:
    """Cluster the loss function's equations into ``layer_num`` layers automatically.

    Attributes:
        layer_num: how many layers (the stage DP then groups layers into stages).
        eps: allowed flops imbalance per layer in the cost-based clustering.
        method: ``"auto"`` tries both the cost-based clustering (balanced flops, small
            boundaries; Alpa's) and the model's own module names (``block_0``, ``block_1``, ...)
            and keeps whichever is better balanced; ``"cost"`` or ``"names"`` force one.
        remat_layer: ``True`` wraps every layer's forward in `jax.checkpoint` (only the values
            entering a layer are kept for the backward pass, which recomputes the rest);
            ``"auto"`` lets the planner choose, the least time within the memory budget
            (pipelines: the stage DP, per stage; ShardParallel: the fewest leading layers
            that fit); ``False`` (default) keeps every activation.
    """

    layer_num: int
    eps: float = 0.5
    method: str = "auto"
    remat_layer: bool | str = False

    def __post_init__(self):
        _check_remat_layer(self.remat_layer)
        _check_positive_int("layer_num", self.layer_num, allow_none=False)
        if self.method not in ("auto", "cost", "names"):
            raise InvalidConfigError(
                f"AutoLayerOption.method must be 'auto', 'cost' or 'names'; got {self.method!r}.")
        if not self.eps >= 0:
            raise InvalidConfigError(f"AutoLayerOption.eps must be >= 0; got {self.eps!r}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ManualLayerOption:
    """Layers are delimited by `alpa_lite.mark_pipeline_boundary()` calls in the model.

    Attributes:
        remat_layer: as in `AutoLayerOption`: ``True``, ``False`` or ``"auto"``.
    """

    remat_layer: bool | str = False

    def __post_init__(self):
        _check_remat_layer(self.remat_layer)


REMAT_CHOICES = (False, True, "auto")


def _check_remat_layer(value) -> None:
    if not any(value is c or (isinstance(c, str) and value == c) for c in REMAT_CHOICES):
        raise InvalidConfigError(
            f"remat_layer must be True, False or 'auto'; got {value!r}. For example "
            "AutoLayerOption(layer_num=4, remat_layer=True).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniformStageOption:
    """Equal numbers of layers per stage on equal submeshes.

    Attributes:
        num_stages: stages (default: the number of layers).
        logical_mesh_shape: logical view of each stage's submesh (default: (1, devices)).
    """

    num_stages: int | None = None
    logical_mesh_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        _check_positive_int("num_stages", self.num_stages)
        object.__setattr__(self, "logical_mesh_shape", _check_mesh_shape(self.logical_mesh_shape))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ManualStageOption:
    """Stages given by hand (Alpa's ManualStageOption).

    Attributes:
        forward_stage_layer_ids: the layers of each stage, e.g. ``((0, 1), (2, 3))``.
        submesh_shapes: ``(hosts, devices)`` per stage, e.g. ``((1, 2), (1, 6))``.
        logical_mesh_shapes: the logical view of each stage's submesh, e.g. ``((1, 2), (2, 3))``.
    """

    forward_stage_layer_ids: tuple[tuple[int, ...], ...]
    submesh_shapes: tuple[tuple[int, int], ...]
    logical_mesh_shapes: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        layers = tuple(tuple(int(i) for i in ids) for ids in self.forward_stage_layer_ids)
        shapes = tuple(tuple(int(d) for d in s) for s in self.submesh_shapes)
        object.__setattr__(self, "forward_stage_layer_ids", layers)
        object.__setattr__(self, "submesh_shapes", shapes)
        flat = [i for ids in layers for i in ids]
        if not layers or flat != list(range(len(flat))):
            raise InvalidConfigError(
                "forward_stage_layer_ids must list every layer once, in order, in contiguous "
                f"groups, e.g. ((0, 1), (2, 3)); got {self.forward_stage_layer_ids}.")
        if len(shapes) != len(layers) or any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise InvalidConfigError(
                f"submesh_shapes needs one (hosts, devices) pair per stage ({len(layers)}); got "
                f"{self.submesh_shapes}.")
        if self.logical_mesh_shapes is not None:
            logical = tuple(_check_mesh_shape(s) for s in self.logical_mesh_shapes)
            if len(logical) != len(layers) or any(
                    math.prod(l) != math.prod(s) for l, s in zip(logical, shapes)):
                raise InvalidConfigError(
                    "logical_mesh_shapes needs one shape per stage with as many devices as its "
                    f"submesh; got {self.logical_mesh_shapes} for submeshes {shapes}.")
            object.__setattr__(self, "logical_mesh_shapes", logical)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoStageOption:
    """Stages and submeshes chosen by Alpa's stage-construction DP.

    Attributes:
        submesh_shapes: candidate ``(hosts, devices)`` submeshes (default: ``(1, 2^k)`` within
            a host and ``(n, devices_per_host)`` across hosts).
        max_num_stages: an upper bound on the number of stages.
    """

    submesh_shapes: tuple[tuple[int, int], ...] | None = None
    max_num_stages: int | None = None

    def __post_init__(self):
        _check_positive_int("max_num_stages", self.max_num_stages)


SCHEDULES = ("auto",) + tuple(kind.value for kind in ScheduleKind)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipeshardParallel:
    """Inter-operator (pipeline) plus intra-operator parallelism (Alpa's PipeshardParallel).

    Attributes:
        num_micro_batches: micro-batches per step (the batch is split on dim 0).
        layer_option: `AutoLayerOption(layer_num=L)` or ``"manual"`` / `ManualLayerOption()`.
        stage_option: ``"auto"`` / `AutoStageOption`, ``"uniform"`` / `UniformStageOption`, or a
            `ManualStageOption`.
        schedule: ``"auto"`` (the planner prices each and takes the fastest that fits),
            ``"1f1b"``, ``"gpipe"``, ``"interleaved-1f1b"`` (every stage holds
            ``virtual_stages`` model chunks) or ``"zb-h1"`` (zero-bubble: backwards split
            into input- and weight-gradient programs); `alpa_lite.pipeline_model.schedules`.
        virtual_stages: model chunks per stage for ``"interleaved-1f1b"`` (default 2); with
            ``"auto"``, the chunk counts tried (default 2 and 4).
        devices: the devices to use (default: all of jax.devices()).
        devices_per_host: how devices group into hosts (default: jax.local_device_count()).
        mesh_alpha / mesh_beta: link model (intra-host, inter-host) when no cluster is given.
        memory_budget_per_device: bytes each device may hold: the stage DP keeps every stage's
            state plus its in-flight activations (1F1B and GPipe differ) under it, and every
            stage's ILP gets it. Default: the device's memory (the cluster's, when planning for
            a `ClusterSpec`).
        strict: see `ShardParallel`.
        solver_time_limit_s: per-stage ILP time limit.

    Example:
        >>> PipeshardParallel(num_micro_batches=4, layer_option=AutoLayerOption(layer_num=2),
        ...                   stage_option="uniform").schedule
        'auto'
    """

    num_micro_batches: int = 1
    layer_option: object = "manual"
    stage_option: object = "auto"
    schedule: str = "auto"
    virtual_stages: int | None = None
    devices: tuple | None = None
    devices_per_host: int | None = None
    mesh_alpha: tuple[float, float] | None = None
    mesh_beta: tuple[float, float] | None = None
    memory_budget_per_device: float | None = None
    strict: bool = False
    solver: str = "auto"
    solver_time_limit_s: float = 60.0

    def __post_init__(self):
        _check_positive_int("num_micro_batches", self.num_micro_batches, allow_none=False)
        if self.memory_budget_per_device is not None and not self.memory_budget_per_device > 0:
            raise InvalidConfigError(
                f"memory_budget_per_device must be a positive number of bytes; got "
                f"{self.memory_budget_per_device!r}. For example memory_budget_per_device=2**30.")
        layer = self.layer_option
        if layer == "manual":
            layer = ManualLayerOption()
        if not isinstance(layer, (AutoLayerOption, ManualLayerOption)):
            raise InvalidConfigError(
                f"layer_option must be AutoLayerOption(layer_num=...), ManualLayerOption() or "
                f"'manual'; got {self.layer_option!r}.")
        stage = {"auto": AutoStageOption(), "uniform": UniformStageOption()}.get(
            self.stage_option, self.stage_option) if isinstance(self.stage_option, str) else \
            self.stage_option
        if not isinstance(stage, (AutoStageOption, UniformStageOption, ManualStageOption)):
            raise InvalidConfigError(
                "stage_option must be 'auto', 'uniform', AutoStageOption, UniformStageOption or "
                f"ManualStageOption; got {self.stage_option!r}.")
        if self.schedule not in SCHEDULES:
            raise InvalidConfigError(
                f"schedule must be one of {SCHEDULES}; got {self.schedule!r}.")
        _check_positive_int("virtual_stages", self.virtual_stages)
        if self.virtual_stages not in (None, 1) and self.schedule not in (
                "auto", "interleaved-1f1b"):
            raise InvalidConfigError(
                f"virtual_stages={self.virtual_stages} needs schedule='interleaved-1f1b' (or "
                f"'auto'); got schedule={self.schedule!r}. Drop virtual_stages or change the "
                "schedule.")
        if self.solver not in SOLVERS:
            raise InvalidConfigError(f"solver must be one of {SOLVERS}; got {self.solver!r}.")
        _check_positive_int("devices_per_host", self.devices_per_host)
        if layer.remat_layer == "auto" and not isinstance(stage, AutoStageOption):
            raise InvalidConfigError(
                f"remat_layer='auto' lets the stage DP choose, so it needs stage_option='auto'; "
                f"got {type(stage).__name__}. Use stage_option='auto', or remat_layer=True or "
                "False with these stages.")
        object.__setattr__(self, "layer_option", layer)
        object.__setattr__(self, "stage_option", stage)
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))

    @property
    def micro_batches(self) -> int:
        return self.num_micro_batches
