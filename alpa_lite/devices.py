"""Where a plan runs and how its meshes are priced without a measured cluster.

`resolve_devices` picks a method's devices; `SimulatedDevice` stands in for them when
planning for a `ClusterSpec`. The one default link model (`default_mesh`) prices a mesh
whose axes may span hosts when the user gives no cluster: it only scales predicted times
(the planners' choices depend on ratios between axes). With a cluster, its links, compute and
profile price every mesh instead (`ClusterSpec.logical_mesh`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np

from alpa_lite.cluster import ClusterSpec
from alpa_lite.config import ShardParallel
from alpa_lite.errors import InvalidConfigError
from alpa_lite.mesh import LogicalMesh

# per link class (intra-host, inter-host): latency; inter-host bandwidth is 4x below
_ALPHA_S = (5e-6, 1e-5)
_INTRA_HOST_BETA_S_PER_BYTE = {"cpu": 1 / 10e9, "gpu": 1 / 100e9, "tpu": 1 / 100e9}
_INTER_HOST_SLOWDOWN = 4
_PEAK_FLOPS = {"cpu": 5e10, "gpu": 4e14, "tpu": 2e14}


@dataclasses.dataclass(frozen=True)
class SimulatedDevice:
    """Stands in for a device when planning for a `ClusterSpec` (never used to run)."""

    id: int
    platform: str = "gpu"


def default_mesh(shape: Sequence[int], spans: Sequence[bool], platform: str, *,
                 alpha: Sequence[float] | None = None, beta: Sequence[float] | None = None,
                 memory: float | None = None) -> LogicalMesh:
    """A `LogicalMesh` of ``shape`` on the default links: an axis that ``spans`` hosts gets
    the inter-host link. ``alpha``/``beta`` override the (intra-host, inter-host) pair."""
    intra_beta = _INTRA_HOST_BETA_S_PER_BYTE.get(platform, 1e-10)
    alphas = tuple(alpha or _ALPHA_S)
    betas = tuple(beta or (intra_beta, intra_beta * _INTER_HOST_SLOWDOWN))
    return LogicalMesh(shape=tuple(shape), alpha_s=tuple(alphas[s] for s in spans),
                       beta_s_per_byte=tuple(betas[s] for s in spans),
                       memory_per_device_bytes=memory,
                       peak_flops_per_s=_PEAK_FLOPS.get(platform, 1e12))


def submesh_spans(shape: Sequence[int], submesh: tuple[int, int]) -> tuple[bool, ...]:
    """Per logical axis of a submesh ``(hosts, devices)`` laid out host-major: does a group
    of devices along it span hosts?"""
    hosts = submesh[0]
    if len(shape) == 1:
        return (hosts > 1,)
    return (hosts > 1 and shape[0] > 1, hosts > 1 and shape[0] < hosts)


def axes_spanning_processes(devices: Sequence, shape: Sequence[int]) -> tuple[bool, ...]:
    """Per mesh axis: does any group of devices along it hold devices of two processes?"""
    procs = np.array([getattr(d, "process_index", 0) for d in devices]).reshape(tuple(shape))
    return tuple(bool(np.any(procs.min(axis=a) != procs.max(axis=a)))
                 for a in range(len(shape)))


def resolve_devices(method: ShardParallel, available: Sequence | None = None) -> list:
    """The devices a method runs on (default: the first prod(mesh_shape) devices)."""
    devices = list(method.devices) if method.devices is not None else list(
        available if available is not None else jax.devices())
    wanted = (len(devices) if method.mesh_shape is None
              else math.prod(method.mesh_shape))
    if wanted > len(devices):
        raise InvalidConfigError(
            f"mesh_shape {method.mesh_shape} needs {wanted} devices but only {len(devices)} are "
            "available. Use a smaller mesh, or on CPU simulate more devices with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N (set before importing jax).")
    return devices[:wanted]


def build_logical_mesh(method: ShardParallel, devices: Sequence, cluster=None) -> LogicalMesh:
    """The method's logical mesh over ``devices``.

    With a ``cluster`` (e.g. ``ClusterSpec.from_devices(profile=...)``), its links, compute
    and profile price the mesh: a mesh axis whose device groups span hosts gets the
    inter-host link. Without one, the method's link model, else defaults in which such an
    axis gets a slower inter-host default.
    """
    shape = method.mesh_shape or (len(devices),)
    if cluster is not None and method.mesh_alpha is None and method.mesh_beta is None:
        hosts = len({getattr(d, "process_index", 0) for d in devices})
        mesh = cluster.logical_mesh((hosts, len(devices) // hosts), shape)
        return dataclasses.replace(mesh, memory_per_device_bytes=method.memory_budget_per_device)
    platform = devices[0].platform if devices else "cpu"
    mesh = default_mesh(shape, axes_spanning_processes(devices, shape), platform,
                        memory=method.memory_budget_per_device)
    # ShardParallel's link model is per mesh axis
    return dataclasses.replace(mesh, alpha_s=tuple(method.mesh_alpha or mesh.alpha_s),
                               beta_s_per_byte=tuple(method.mesh_beta or mesh.beta_s_per_byte))


def default_memory_budget(cluster, devices) -> float | None:
    """The memory of one device: the cluster's, else what the live devices report."""
    if cluster is not None:
        return float(cluster.memory_per_device_bytes)
    if not devices or isinstance(devices[0], SimulatedDevice):
        return None
    try:
        return float(ClusterSpec.from_devices(devices).memory_per_device_bytes)
    except InvalidConfigError:  # uneven hosts: no single number
        return None


def stage_mesh_builder(cluster, platform: str, links=(None, None)):
    """``(submesh, view) -> LogicalMesh``: the cluster's links and compute when a cluster is
    given, else ``links`` (a method's ``(mesh_alpha, mesh_beta)`` pairs) or the platform's
    default links."""
    if cluster is not None:
        return lambda shape, view: cluster.logical_mesh(tuple(shape), tuple(view))
    alpha, beta = links
    return lambda shape, view: default_mesh(view, submesh_spans(view, shape), platform,
                                            alpha=alpha, beta=beta)


def stage_link(cluster, per_host: int, num_devices: int, platform: str = "cpu",
               links=(None, None)) -> tuple[float, float]:
    """(alpha, seconds per byte) of a stage-to-stage transfer: the inter-host link when the
    devices span hosts (stages then usually sit on different hosts), else the intra-host;
    the cluster's, else ``links`` (a method's ``(mesh_alpha, mesh_beta)`` pairs) or the
    default links of ``platform``."""
    across = num_devices > per_host
    if cluster is not None:
        spec = cluster.inter_host if across else cluster.intra_host
        return spec.alpha_s, spec.beta_s_per_byte
    mesh = default_mesh((2,), (across,), platform, alpha=links[0], beta=links[1])
    return mesh.alpha_s[0], mesh.beta_s_per_byte[0]
