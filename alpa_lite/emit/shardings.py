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

from typing import Callable

import jax
from jax.sharding import Mesh, NamedSharding

from alpa_lite._jax_compat import bind_params
from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.problem import is_transparent
from alpa_lite.intra_op.resharding import build_resharding_steps
from alpa_lite.intra_op.strategies import Spec
from alpa_lite.emit.deferred import (DeferredReductions, bind_over_partials,
                                     emit_partial_result, emit_reduce_scatter,
                                     scatter_collective)
from alpa_lite.emit.specs import spec_to_partition_spec, value_specs
from alpa_lite.plan import ShardingPlan


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

    def eval_nodes(env: dict, node_indices, deferred: DeferredReductions | None = None,
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
                outs = bind_over_partials(node, params, env, deferred.partial_values)
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
            if decision is not None and scatter_collective(decision) is not None:
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
