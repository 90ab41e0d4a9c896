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

A scan expanded into a `LoopRegion` is emitted as one ``jax.lax.scan`` whose body evaluates the
region's body nodes with the same constraints, so the plan's shardings (and the collectives
they imply) sit inside the compiled while loop; the carry leaving an iteration is resharded to
the spec it entered with (the ILP prices that loop-back edge, and usually makes it free).
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.extend.core import jaxpr_as_fun
from jax.sharding import Mesh, NamedSharding

from alpa_lite._jax_compat import bind_params
from alpa_lite.graph import OpGraph
from alpa_lite.loop_regions import LoopRegion
from alpa_lite.intra_op.problem import is_transparent
from alpa_lite.intra_op.resharding import build_resharding_steps
from alpa_lite.intra_op.strategies import Spec
from alpa_lite.emit.deferred import (DeferredReductions, bind_over_partials,
                                     emit_partial_result, emit_reduce_scatter,
                                     scatter_collective)
from alpa_lite.emit.specs import spec_to_partition_spec
from alpa_lite.plan import ShardingPlan, value_specs


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

    inner = graph.innermost_loop()

    def region_at(index: int, level: int) -> int:
        """The region directly inside ``level`` (a region index, -1: top) holding ``index``."""
        r = inner[index]
        while r != -1 and graph.loops[r].parent != level:
            r = graph.loops[r].parent
        return r

    def reshard_to(value, v, want: Spec):
        if not isinstance(v, int):
            return v.val
        for spec in build_resharding_steps(planned[v], want, plan.mesh):
            value = constrain(value, spec)
        return constrain(value, want)

    def run_cond(env: dict, r: int, overrides) -> None:
        region: LoopRegion = graph.loops[r]
        index_node = graph.nodes[region.index_enter]
        index = operand(env, None, 0, index_node.invars[0])
        enter = [graph.nodes[i] for i in region.carry_enter]
        operands = [operand(env, decisions[n.index], 0, n.invars[0]) for n in enter]
        exits = [decisions[i] for i in region.carry_exit]

        def branch_fn(k: int):
            def run(*ops):
                body_env = dict(env)
                body_env[index_node.outvars[0]] = index
                for node, value in zip(enter, ops):
                    body_env[node.outvars[0]] = constrain(
                        value, decisions[node.index].out_specs[0])
                eval_nodes(body_env, region.branches[k], overrides=overrides, level=r)
                outs = []
                for v, d, var in zip(region.branch_outs[k], exits, region.carry_exit):
                    value = reshard_to(body_env[v] if isinstance(v, int) else None, v,
                                       d.in_specs[k + 1])
                    outs.append(jax.numpy.asarray(
                        value, dtype=graph.avals[graph.nodes[var].outvars[0]].dtype))
                return outs
            return run

        results = jax.lax.switch(index, [branch_fn(k) for k in range(len(region.branches))],
                                 *operands)
        for i, value in zip(region.carry_exit, results):
            env[graph.nodes[i].outvars[0]] = constrain(value, decisions[i].out_specs[0])

    def run_loop(env: dict, r: int, overrides) -> None:
        loop: LoopRegion = graph.loops[r]
        if loop.branches:
            run_cond(env, r, overrides)
            return
        border = set(loop.carry_enter + loop.slice_enter + loop.carry_exit + loop.stack_exit
                     + loop.invariant_enter)
        body_nodes = [i for i in range(loop.first, loop.last + 1) if i not in border]
        enter = [graph.nodes[i] for i in loop.carry_enter + loop.slice_enter]
        spec_of = lambda node, pos: decisions[node.index].in_specs[pos]  # noqa: E731
        init = [operand(env, decisions[n.index], 0, n.invars[0]) for n in enter]
        n_carry = len(loop.carry_enter)
        carry_specs = [decisions[i].out_specs[0] for i in loop.carry_enter]

        def body(carry, xs):
            body_env = dict(env)
            for node, value in zip(enter, list(carry) + list(xs)):
                body_env[node.outvars[0]] = constrain(value, decisions[node.index].out_specs[0])
            eval_nodes(body_env, body_nodes, overrides=overrides, level=r)
            new_carry = [reshard_to(body_env[v] if isinstance(v, int) else None, v, spec)
                         for v, spec in zip(loop.carry_out, carry_specs)]
            new_carry = [jax.numpy.asarray(c, dtype=old.dtype) for c, old in zip(new_carry, carry)]
            ys = []
            for i in loop.stack_exit:
                node = graph.nodes[i]
                v = node.invars[0]
                ys.append(reshard_to(body_env[v] if isinstance(v, int) else None, v,
                                     spec_of(node, 0)))
            return new_carry, ys

        if loop.cond_jaxpr is not None:  # a while loop with a fixed trip count
            cond_args = [env[v] if isinstance(v, int) else v.val for v in loop.cond_consts]
            cond = jaxpr_as_fun(loop.cond_jaxpr)
            final = jax.lax.while_loop(lambda c: cond(*cond_args, *c)[0],
                                       lambda c: body(c, [])[0], init)
            ys = []
        else:
            final, ys = jax.lax.scan(body, init[:n_carry], init[n_carry:], length=loop.length,
                                     reverse=loop.reverse, unroll=loop.unroll)
        for i, value in zip(loop.carry_exit + loop.stack_exit, list(final) + list(ys)):
            node = graph.nodes[i]
            env[node.outvars[0]] = constrain(value, decisions[i].out_specs[0])

    def eval_nodes(env: dict, node_indices, deferred: DeferredReductions | None = None,
                   overrides: dict | None = None, level: int = -1):
        for index in node_indices:
            r = region_at(index, level)
            if r != -1:
                if index == graph.loops[r].last:
                    run_loop(env, r, overrides)
                continue
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
