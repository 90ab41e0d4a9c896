"""Stage assignment: which layers form which stage, on which submesh, viewed how.

`StageAssignment` and the arithmetic options (uniform, manual), the logical views of a submesh,
and where stages go on the devices
(`place_stages`). The automatic option is priced and solved in `inter_op.pricing` (the path
`parallelize` and simulation share) with Alpa's stage DP (`inter_op.stage_dp`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math


from alpa_lite.config import ManualStageOption, UniformStageOption
from alpa_lite.errors import InvalidConfigError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StageAssignment:
    """Layers -> stages, and each stage's submesh and logical mesh shape.

    Attributes:
        layer_to_stage: stage index of every layer.
        submesh_shapes: ``(hosts, devices per host)`` of each stage.
        logical_shapes: the logical mesh shape of each stage.
        predicted_latency_s: the stage DP's objective (auto only).
        stage_costs_s: predicted forward+backward time of one micro-batch per stage (auto only).
        remat: per stage, whether its layers are rematerialized (None: as the layer option
            says; set when the stage DP chose, ``remat_layer="auto"``).
        lean: per stage, the memory price level of the layer plans the DP priced it with
            (0 for the fastest plans, else one of `pricing.LEAN_LEVELS`; None when it was
            not offered memory-lean plans).
    """

    layer_to_stage: tuple[int, ...]
    submesh_shapes: tuple[tuple[int, int], ...]
    logical_shapes: tuple[tuple[int, ...], ...]
    predicted_latency_s: float = math.nan
    stage_costs_s: tuple[float, ...] = ()
    remat: tuple[bool, ...] | None = None
    lean: tuple[float, ...] | None = None

    @property
    def num_stages(self) -> int:
        return len(self.submesh_shapes)

    def stage_layers(self, stage: int) -> list[int]:
        return [layer for layer, s in enumerate(self.layer_to_stage) if s == stage]


def submesh_devices(shape: tuple[int, int]) -> int:
    return shape[0] * shape[1]


def assign_uniform(option: UniformStageOption, num_layers: int, num_devices: int,
                   devices_per_host: int) -> StageAssignment:
    num_stages = option.num_stages or num_layers
    if num_layers % num_stages or num_devices % num_stages:
        raise InvalidConfigError(
            f"stage_option='uniform' needs the number of stages ({num_stages}) to divide both the "
            f"layers ({num_layers}) and the devices ({num_devices}). Pick num_stages accordingly, "
            "or use a ManualStageOption.")
    per_stage = num_devices // num_stages
    submesh = (1, per_stage) if per_stage <= devices_per_host else (
        per_stage // devices_per_host, devices_per_host)
    logical = option.logical_mesh_shape or (per_stage,)
    if math.prod(logical) != per_stage:
        raise InvalidConfigError(
            f"logical_mesh_shape {logical} has {math.prod(logical)} devices but each stage has "
            f"{per_stage}.")
    per_layer = num_layers // num_stages
    return StageAssignment(tuple(layer // per_layer for layer in range(num_layers)),
                           (submesh,) * num_stages, (tuple(logical),) * num_stages)


def assign_manual(option: ManualStageOption, num_layers: int, num_devices: int) -> StageAssignment:
    flat = [i for ids in option.forward_stage_layer_ids for i in ids]
    if len(flat) != num_layers:
        raise InvalidConfigError(
            f"ManualStageOption covers {len(flat)} layers but the model has {num_layers}. List "
            f"every layer 0..{num_layers - 1} once.")
    used = sum(submesh_devices(s) for s in option.submesh_shapes)
    if used != num_devices:
        raise InvalidConfigError(
            f"ManualStageOption submeshes use {used} devices but {num_devices} are available; "
            "the submeshes must use every device exactly once.")
    layer_to_stage = [0] * num_layers
    for stage, ids in enumerate(option.forward_stage_layer_ids):
        for layer in ids:
            layer_to_stage[layer] = stage
    logical = option.logical_mesh_shapes or tuple(
        (submesh_devices(s),) for s in option.submesh_shapes)
    return StageAssignment(tuple(layer_to_stage), option.submesh_shapes, tuple(logical))


def place_stages(submesh_shapes, devices, devices_per_host: int) -> list[tuple]:
    """The devices of each stage: a stage of ``(1, m)`` stays inside one host, a stage of
    ``(n, m)`` takes ``m`` devices on each of ``n`` hosts (hosts: consecutive groups of
    ``devices_per_host`` devices, i.e. processes in a multi-process job).

    Stages take consecutive devices in order when that keeps every stage within its hosts;
    otherwise they are placed largest first, each on the first host with room (first-fit
    decreasing, which always fits Alpa's power-of-two submeshes); if that fails (manual
    shapes that do not pack), stages take consecutive devices in order.
    """
    devices = list(devices)
    per_host = max(min(devices_per_host, len(devices)), 1)
    in_order, offset = [], 0
    for shape in submesh_shapes:
        in_order.append(tuple(devices[offset:offset + submesh_devices(shape)]))
        offset += submesh_devices(shape)
    if all(_fits_hosts(shape, start, per_host) for shape, start in zip(
            submesh_shapes, itertools.accumulate([0] + [submesh_devices(s)
                                                        for s in submesh_shapes]))):
        return in_order
    hosts = [devices[i:i + per_host] for i in range(0, len(devices), per_host)]
    free = [list(h) for h in hosts]
    placed: dict[int, tuple] = {}
    order = sorted(range(len(submesh_shapes)), key=lambda s: -submesh_devices(submesh_shapes[s]))
    for stage in order:
        n_hosts, m = submesh_shapes[stage]
        chosen = [h for h, left in enumerate(free) if len(left) >= m][:n_hosts]
        if len(chosen) < n_hosts:
            break
        placed[stage] = tuple(d for h in chosen for d in free[h][:m])
        for h in chosen:
            free[h] = free[h][m:]
    if len(placed) == len(submesh_shapes):
        return [placed[s] for s in range(len(submesh_shapes))]
    return in_order


def _fits_hosts(shape, start: int, per_host: int) -> bool:
    """Consecutive devices from ``start`` keep a ``(1, m)`` stage inside one host and start
    an ``(n, m)`` stage on a host boundary."""
    n_hosts, m = shape
    if n_hosts == 1:
        return start // per_host == (start + m - 1) // per_host
    return start % per_host == 0 and m == per_host


def logical_views(submesh: tuple[int, int]) -> list[tuple[int, ...]]:
    """Logical views of a submesh to try: (n,) and (n / mp, mp) for mp = 2, 4, ... up to the
    devices of one host (model parallelism stays on the fast intra-host links)."""
    n = submesh_devices(submesh)
    views = [(n,)]
    mp = 2
    while mp <= submesh[1] and mp < n:
        if n % mp == 0:
            views.append((n // mp, mp))
        mp *= 2
    return views
