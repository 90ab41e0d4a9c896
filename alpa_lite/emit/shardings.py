"""Emit an intra-op plan as a jax function: re-interpret the graph, pinning the plan's choices.

Input: `OpGraph` + `ShardingPlan` + a jax `Mesh`. Output: a function of the flat inputs that
re-binds every operator and wraps chosen values in `jax.lax.with_sharding_constraint`:
the outputs of *anchor* operators (group leaders, operators with collectives, matmuls) get the
plan's output spec, and an operand whose planned spec differs from the spec its consumer
requires gets the consumer's spec (that is where XLA inserts the resharding collective).
A resharded value is pinned to its planned spec where it is produced, and the reshard goes
through `build_resharding_steps`, so that XLA reshards the value the plan priced, with the
collectives it priced. XLA's partitioner does the rest, and the compiled program's
collectives follow the plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alpa_lite._jax_compat import bind_params
from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.problem import is_transparent
from alpa_lite.intra_op.resharding import build_resharding_steps
from alpa_lite.intra_op.strategies import Spec, replicated_spec
from alpa_lite.mesh import LogicalMesh
from alpa_lite.plan import ShardingPlan

if TYPE_CHECKING:
    from alpa_lite.emit.accumulate import DeferredReductions


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


def build_node_evaluator(graph: OpGraph, plan: ShardingPlan, jax_mesh: Mesh) -> Callable:
    """``eval_nodes(env, node_indices, deferred=None, overrides=None)``: evaluates nodes.

    ``overrides`` maps a node index to a function of its operands returning its outputs,
    used instead of binding the node's primitive.

    ``deferred`` (from `find_deferred_reductions`) maps nodes whose cross-device reduction is
    postponed to the reduction's mesh axes, and lists the linear nodes that carry such partial
    sums; their values get a leading dim of one partial result per device group.
    """
    if len(plan.nodes) != sum(1 for n in graph.nodes if not is_transparent(n.primitive)):
        raise ValueError("The plan does not belong to this graph (operator counts differ).")
    planned = value_specs(graph, plan)
    decisions = {d.index: d for d in plan.nodes}
    to_pin = find_unpinned_resharded_values(graph, plan, planned)

    def constrain(value, spec: Spec):
        if not spec or not hasattr(value, "ndim") or value.ndim == 0:
            return value
        return jax.lax.with_sharding_constraint(
            value, NamedSharding(jax_mesh, spec_to_partition_spec(spec)))

    def operand(env, decision, pos, v):
        if not isinstance(v, int):
            return v.val
        want = decision.in_specs[pos] if decision is not None else None
        value = env[v]
        if want is not None and want != planned[v]:
            for spec in build_resharding_steps(planned[v], want, plan.mesh):
                value = constrain(value, spec)
        return value

    def eval_nodes(env: dict, node_indices, deferred: "DeferredReductions | None" = None,
                   overrides: dict | None = None):
        for index in node_indices:
            node = graph.nodes[index]
            decision = decisions.get(index)
            if overrides and index in overrides:  # e.g. a micro-batch's slice of random bits
                invals = [operand(env, decision, pos, v) for pos, v in enumerate(node.invars)]
                env.update(zip(node.outvars, overrides[index](*invals)))
                continue
            params = bind_params(node.primitive, node.params)
            if deferred is not None and index in deferred.carriers:
                outs = _bind_over_partials(node, params, env, deferred.partial_values)
                if not is_transparent(node.primitive):
                    deferred.partial_values.update(node.outvars)
                env.update(zip(node.outvars, outs))
                continue
            invals = [operand(env, decision, pos, v) for pos, v in enumerate(node.invars)]
            if deferred is not None and index in deferred.reductions:
                outs = [emit_partial_result(node, decision, invals, jax_mesh)]
                deferred.partial_values.update(node.outvars)
                env.update(zip(node.outvars, outs))
                continue
            if decision is not None and _scatter_collective(decision) is not None:
                outs = [emit_reduce_scatter(node, decision, invals, jax_mesh)]
            else:
                outs = node.primitive.bind(*invals, **params)
                outs = outs if node.primitive.multiple_results else [outs]
            if decision is not None and decision.anchor:
                outs = [constrain(o, s) for o, s in zip(outs, decision.out_specs)]
            outs = [constrain(o, planned[v]) if v in to_pin else o
                    for o, v in zip(outs, node.outvars)]
            env.update(zip(node.outvars, outs))

    return eval_nodes


def find_unpinned_resharded_values(graph: OpGraph, plan: ShardingPlan,
                                   planned: dict[int, Spec]) -> set[int]:
    """Values some consumer reshards whose producer's output is not pinned (not an anchor).

    A sharding constraint on a consumer's operand does not fix where XLA reshards: sharding
    propagation may carry the consumer's spec backwards through unpinned operators (a reshape,
    a transpose) to the last pinned value, where the same data movement can be one XLA has no
    collective for. In GPT's attention, ``[b, s, heads, head_dim] -> [b, s, h]`` is resharded
    from ``[x, -, -]`` to ``[-, -, x]`` (an all-to-all) for the weight gradient; carried back
    over the reshape it becomes ``[x, -, -, -] -> [-, -, x(4), x(2)]``, which XLA does by
    replicating the whole tensor. Pinning the value where it is produced keeps the reshard on it.
    """
    resharded = {v for d in plan.nodes
                 for v, want in zip(graph.nodes[d.index].invars, d.in_specs)
                 if isinstance(v, int) and want is not None and want != planned[v]}
    anchored = {v for d in plan.nodes if d.anchor for v in graph.nodes[d.index].outvars}
    return resharded - anchored - set(graph.inputs)


def _bind_over_partials(node, params, env, partial_values):
    """Applies a linear node to values that carry a leading partial-sum dim (vmapped).

    Identity markers pass their operands through unchanged (they lower to nothing anyway).
    """
    args = [env[v] if isinstance(v, int) else v.val for v in node.invars]
    if is_transparent(node.primitive):
        partial_values.update(d for s, d in zip(node.invars, node.outvars)
                              if isinstance(s, int) and s in partial_values)
        return args
    axes = [0 if isinstance(v, int) and v in partial_values else None for v in node.invars]
    out = jax.vmap(lambda *a: node.primitive.bind(*a, **params), in_axes=axes)(*args)
    return out if node.primitive.multiple_results else [out]


def _pre_reduction_spec(decision) -> Spec:
    """The result spec before the strategy's collective (a reduce-scatter's dim unsplit)."""
    out_spec = decision.out_specs[0]
    scatter = _scatter_collective(decision)
    if scatter is None:
        return out_spec
    return tuple(() if tuple(a) == tuple(scatter[1]) else a for a in out_spec)


def reduction_axes(decision) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a for kind, axes, _ in decision.collectives
                               if kind in ("all-reduce", "reduce-scatter") for a in axes))


def emit_partial_result(node, decision, invals, jax_mesh: Mesh):
    """The node's local results, unreduced: shape ``[devices along R, *result]``.

    Summing over the leading dim later (once per step) performs the reduction the strategy
    would otherwise do on every micro-batch.
    """
    axes = reduction_axes(decision)
    params = bind_params(node.primitive, node.params)
    in_specs = tuple(spec_to_partition_spec(s) if s is not None else PartitionSpec()
                     for s in decision.in_specs)
    out_spec = spec_to_partition_spec(((axes),) + _pre_reduction_spec(decision))
    return jax.shard_map(lambda *ops: node.primitive.bind(*ops, **params)[None], mesh=jax_mesh,
                         in_specs=in_specs, out_specs=out_spec, check_vma=False)(*invals)


def finish_partial_sum(value, axes: tuple[str, ...], spec: Spec, jax_mesh: Mesh):
    """Reduces ``[devices along axes, *shape]`` partial sums to the planned ``spec``.

    One all-reduce over ``axes`` (a reduce-scatter when ``spec`` splits a dim over exactly
    ``axes``).
    """
    axes = tuple(axes)
    scatter_dim = next((d for d, a in enumerate(spec) if tuple(a) == axes), None)
    without = tuple(tuple(x for x in a if x not in axes) for a in spec)
    result_spec = tuple(axes if d == scatter_dim else a for d, a in enumerate(without))

    def reduce(block):
        if scatter_dim is None:
            return jax.lax.psum(block[0], axes)
        return jax.lax.psum_scatter(block[0], axes, scatter_dimension=scatter_dim, tiled=True)

    reduced = jax.shard_map(reduce, mesh=jax_mesh,
                            in_specs=spec_to_partition_spec((axes,) + without),
                            out_specs=spec_to_partition_spec(result_spec), check_vma=False)(value)
    if result_spec == spec:
        return reduced
    return jax.lax.with_sharding_constraint(
        reduced, NamedSharding(jax_mesh, spec_to_partition_spec(spec)))


def _scatter_collective(decision):
    return next((c for c in decision.collectives if c[0] == "reduce-scatter"), None)


def emit_reduce_scatter(node, decision, invals, jax_mesh: Mesh):
    """Emits a reduce-scatter strategy literally: local op, then `psum_scatter`.

    XLA's CPU pipeline turns "partial result constrained to a sharded layout" into an
    all-reduce plus a slice; writing the op under `shard_map` keeps the planned collective.
    """
    _, axes, _ = _scatter_collective(decision)
    out_spec = decision.out_specs[0]
    dim = next(d for d, a in enumerate(out_spec) if tuple(a) == tuple(axes))
    params = bind_params(node.primitive, node.params)

    def local(*operands):
        partial = node.primitive.bind(*operands, **params)
        return jax.lax.psum_scatter(partial, tuple(axes), scatter_dimension=dim, tiled=True)

    in_specs = tuple(spec_to_partition_spec(s) for s in decision.in_specs)
    return jax.shard_map(local, mesh=jax_mesh, in_specs=in_specs,
                         out_specs=spec_to_partition_spec(out_spec), check_vma=False)(*invals)


def emit_flat_function(graph: OpGraph, plan: ShardingPlan, jax_mesh: Mesh) -> Callable:
    """A function of the flat inputs computing the graph under the plan's constraints."""
    eval_nodes = build_node_evaluator(graph, plan, jax_mesh)
    all_nodes = range(len(graph.nodes))

    def run(*flat_args):
        env = dict(zip(graph.inputs, flat_args))
        env.update(graph.consts)
        eval_nodes(env, all_nodes)
        return tuple(env[v] if isinstance(v, int) else v.val for v in graph.outputs)

    return run
