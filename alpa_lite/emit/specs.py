"""Plan specs as jax objects: meshes, `PartitionSpec`s, `NamedSharding`s."""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alpa_lite.mesh import LogicalMesh, Spec


def spec_to_partition_spec(spec: Spec) -> PartitionSpec:
    """``(("x",), (), ("x","y"))`` -> ``P("x", None, ("x", "y"))``.

    Example:
        >>> spec_to_partition_spec((("x",), (), ("x", "y")))
        PartitionSpec('x', None, ('x', 'y'))
    """
    return PartitionSpec(*[None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
                           for axes in spec])


def build_jax_mesh(mesh: LogicalMesh, devices) -> Mesh:
    """A jax `Mesh` over ``devices`` with the logical mesh's shape and axis names."""
    devices = np.asarray(devices, dtype=object).reshape(mesh.shape)
    return Mesh(devices, mesh.axis_names)


def named_shardings(specs, jax_mesh: Mesh) -> tuple[NamedSharding, ...]:
    return tuple(NamedSharding(jax_mesh, spec_to_partition_spec(s)) for s in specs)
