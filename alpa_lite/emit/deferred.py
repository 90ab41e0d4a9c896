"""Deferred reductions: cross-device sums postponed from every micro-batch to once per step.

A reduction whose result only flows, linearly, into gradients (the all-reduce of a weight
gradient under data parallelism, say) is emitted unreduced: each device keeps its partial
sums with a leading dim over the reduction's mesh axes, accumulates them over the
micro-batches, and `finish_partial_sum` reduces once per step, as Alpa does. Used by the
single-mesh accumulation (`emit/accumulate.py`), the node evaluator (`emit/shardings.py`) and
the pipeline runtime (`emit/pipeline.py`).
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alpa_lite._jax_compat import bind_params
from alpa_lite.emit.specs import spec_to_partition_spec
from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.problem import is_transparent
from alpa_lite.intra_op.strategies import Spec
from alpa_lite.cost.linearity import Linearity, linearity
from alpa_lite.markers import layer_boundary_p
from alpa_lite.plan import ShardingPlan


def _is_carrier(primitive) -> bool:
    return linearity(primitive) is Linearity.LINEAR_CARRIER


@dataclasses.dataclass
class DeferredReductions:
    """Reductions postponed from every micro-batch to once per step.

    Attributes:
        reductions: node index -> mesh axes of the reduction it would do (emitted unreduced).
        carriers: linear nodes between those reductions and the boundary (run on partials).
        boundary_axes: boundary operand value id -> axes, for operands that arrive unreduced.
        partial_values: filled while tracing: value ids currently holding partial sums.
    """

    reductions: dict[int, tuple[str, ...]]
    carriers: set[int]
    boundary_axes: dict[int, tuple[str, ...]]
    partial_values: set = dataclasses.field(default_factory=set)


def find_deferred_reductions(graph: OpGraph, plan: ShardingPlan, nodes,
                             boundary_index: int, summed=None) -> DeferredReductions:
    """Finds cross-device reductions whose results only flow, linearly, into gradients.

    Such a reduction (the all-reduce of a weight gradient under data parallelism, say) can be
    postponed: each device accumulates its unreduced local result over the micro-batches and
    the reduction runs once per step, as Alpa does. A value qualifies when every path from it
    reaches the boundary node through linear carriers (`linearity`) among ``nodes`` only, all
    of whose array operands carry partial sums over the same mesh axes.

    Args:
        graph: the graph ``nodes`` and ``boundary_index`` index into.
        plan: its sharding plan.
        nodes: the nodes run once per micro-batch (program order).
        boundary_index: the grad_boundary node whose operands are accumulated.
        summed: the boundary operands accumulated by summing (sums, means, gradients); None
            means all. Maxima, minima, per-example and batch-independent values are not.
    """
    decisions = {d.index: d for d in plan.nodes}
    nodes = [i for i in nodes if i != boundary_index]
    inside = set(nodes)
    axes_of: dict[int, tuple[str, ...]] = {}
    for index in nodes:
        node, decision = graph.nodes[index], decisions.get(index)
        if node.primitive is layer_boundary_p:  # identity per operand
            for src, dst in zip(node.invars, node.outvars):
                if isinstance(src, int) and src in axes_of:
                    axes_of[dst] = axes_of[src]
        elif (decision is not None and linearity(node.primitive) is Linearity.SUM_REDUCER
              and reduction_axes(decision) and len(node.outvars) == 1):
            axes_of[node.outvars[0]] = reduction_axes(decision)
        elif _is_carrier(node.primitive) and len(node.outvars) == 1:
            ins = {axes_of.get(v) for v in node.invars if isinstance(v, int)}
            if len(ins) == 1 and None not in ins:
                axes_of[node.outvars[0]] = ins.pop()
    users = graph.users()
    ok: dict[int, bool] = {}

    def carried(user: int, v: int) -> list[int]:
        """The outputs of ``user`` that carry ``v`` on, if ``user`` is a linear carrier."""
        node = graph.nodes[user]
        if user not in inside:
            return []
        if node.primitive is layer_boundary_p:
            return [d for s_, d in zip(node.invars, node.outvars) if s_ == v]
        return list(node.outvars) if _is_carrier(node.primitive) else []

    boundary_ok = lambda v: summed is None or v in summed
    for index in reversed(nodes):  # a value is deferrable if all its users are
        for v in graph.nodes[index].outvars:
            ok[v] = v in axes_of and bool(users[v]) and all(
                (u == boundary_index and boundary_ok(v))
                or (carried(u, v) and all(ok.get(o) for o in carried(u, v)))
                for u in users[v])
    is_carrier = lambda i: _is_carrier(graph.nodes[i].primitive) or \
        graph.nodes[i].primitive is layer_boundary_p
    reductions = {i: axes_of[graph.nodes[i].outvars[0]] for i in nodes
                  if not is_carrier(i) and graph.nodes[i].outvars
                  and ok.get(graph.nodes[i].outvars[0])}
    carriers = {i for i in nodes if is_carrier(i)
                and any(ok.get(o) for o in graph.nodes[i].outvars)}
    boundary = graph.nodes[boundary_index]
    boundary_axes = {v: axes_of[v] for v in boundary.invars if isinstance(v, int) and ok.get(v)}
    return DeferredReductions(reductions, carriers, boundary_axes)


def bind_over_partials(node, params, env, partial_values):
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
    scatter = scatter_collective(decision)
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


def scatter_collective(decision):
    return next((c for c in decision.collectives if c[0] == "reduce-scatter"), None)


def emit_reduce_scatter(node, decision, invals, jax_mesh: Mesh):
    """Emits a reduce-scatter strategy literally: local op, then `psum_scatter`.

    XLA's CPU pipeline turns "partial result constrained to a sharded layout" into an
    all-reduce plus a slice; writing the op under `shard_map` keeps the planned collective.
    """
    _, axes, _ = scatter_collective(decision)
    out_spec = decision.out_specs[0]
    dim = next(d for d, a in enumerate(out_spec) if tuple(a) == tuple(axes))
    params = bind_params(node.primitive, node.params)

    def local(*operands):
        partial = node.primitive.bind(*operands, **params)
        return jax.lax.psum_scatter(partial, tuple(axes), scatter_dimension=dim, tiled=True)

    in_specs = tuple(spec_to_partition_spec(s) for s in decision.in_specs)
    return jax.shard_map(local, mesh=jax_mesh, in_specs=in_specs,
                         out_specs=spec_to_partition_spec(out_spec), check_vma=False)(*invals)
