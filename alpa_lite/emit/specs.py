"""Plan specs as jax objects: meshes, `PartitionSpec`s, `NamedSharding`s, and the planned spec
of every value of a graph."""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.strategies import Spec, replicated_spec
from alpa_lite.mesh import LogicalMesh
from alpa_lite.plan import ShardingPlan


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


def value_specs(graph: OpGraph, plan: ShardingPlan) -> dict[int, Spec]:
    """The planned spec of every value id."""
    specs: dict[int, Spec] = dict(zip(graph.inputs, plan.input_specs))
    for vid, _ in graph.consts:
        specs[vid] = replicated_spec(len(graph.avals[vid].shape))
    decisions = {d.index: d for d in plan.nodes}
    for node in graph.nodes:
        decision = decisions.get(node.index)
        if decision is None:  # transparent: outputs are the inputs
            for src, dst in zip(node.invars, node.outvars):
                specs[dst] = specs[src] if isinstance(src, int) else replicated_spec(
                    len(graph.avals[dst].shape))
            continue
        for vid, spec in zip(node.outvars, decision.out_specs):
            specs[vid] = spec
    return specs
