"""Resharding cost: seconds to turn a tensor laid out by one spec into another (ILP edge costs).

Per mesh axis: unchanged -> free; newly split -> free (each device slices what it has);
no longer split -> all-gather over that axis; moved to another dim -> all-to-all.
Costs of several axes add up.
"""

from __future__ import annotations

import functools
import math

from alpa_lite.cost.collectives import Collective, estimate_collective_s
from alpa_lite.intra_op.strategies import Spec, spec_shards
from alpa_lite.mesh import LogicalMesh


def _axis_dims(spec: Spec) -> dict[str, int]:
    return {axis: dim for dim, axes in enumerate(spec) for axis in axes}


@functools.lru_cache(maxsize=1 << 18)
def estimate_resharding_s(src: Spec, dst: Spec, num_bytes: float, mesh: LogicalMesh) -> float:
    """Seconds to convert a tensor of ``num_bytes`` (global) from ``src`` to ``dst``.

    Example:
        >>> mesh = LogicalMesh(shape=(4,), alpha_s=(1.0,), beta_s_per_byte=(1.0,))
        >>> estimate_resharding_s(((),), (("x",),), 400.0, mesh)  # slicing is free
        0.0
        >>> estimate_resharding_s((("x",),), ((),), 400.0, mesh)  # all-gather 400 B
        301.1
    """
    if src == dst:
        return 0.0
    src_dims, dst_dims = _axis_dims(src), _axis_dims(dst)
    total = 0.0
    for axis in mesh.sharding_axes:
        s_dim, d_dim = src_dims.get(axis), dst_dims.get(axis)
        if s_dim == d_dim or s_dim is None:
            continue
        if d_dim is None:
            gathered = num_bytes / spec_shards(dst, mesh)
            total += estimate_collective_s(Collective.ALL_GATHER, mesh, (axis,), gathered)
        else:
            local = num_bytes / spec_shards(src, mesh)
            total += estimate_collective_s(Collective.ALL_TO_ALL, mesh, (axis,), local)
    return total


def tensor_bytes(aval) -> float:
    return float(math.prod(aval.shape)) * aval.dtype.itemsize
