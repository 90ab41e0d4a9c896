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
    return _NodeEvaluator(graph, plan, jax_mesh).eval_nodes


class _NodeEvaluator:
    """Re-binds a graph's nodes into an environment (value id -> value), under a plan.

    Three jobs: single nodes (`_node_outputs`: the planned operator, with the constraints
    that pin the plan), loop regions (`_run_loop`: one scan or while loop) and cond regions
    (`_run_cond`: one switch). Both kinds of region evaluate their body with `eval_nodes`.
    """

    def __init__(self, graph: OpGraph, plan: ShardingPlan, jax_mesh: Mesh):
        self.graph, self.mesh, self.jax_mesh = graph, plan.mesh, jax_mesh
        self.planned = value_specs(graph, plan)
        self.decisions = {d.index: d for d in plan.nodes}
        self.to_pin = find_unpinned_resharded_values(graph, plan, self.planned)
        self.inner = graph.innermost_loop()

    # Values and their constraints.

    def constrain(self, value, spec: Spec):
        """``value`` pinned to ``spec`` (scalars, non-arrays and empty specs stay free)."""
        if not spec or not hasattr(value, "ndim") or value.ndim == 0:
            return value
        return jax.lax.with_sharding_constraint(
            value, NamedSharding(self.jax_mesh, spec_to_partition_spec(spec)))

    @staticmethod
    def _read(env: dict, v):
        """The value of ``v``: from ``env``, or the literal's own."""
        return env[v] if isinstance(v, int) else v.val

    def _through_steps(self, value, src: Spec, dst: Spec):
        """``value`` constrained through each step of the reshard from ``src`` to ``dst``."""
        for spec in build_resharding_steps(src, dst, self.mesh):
            value = self.constrain(value, spec)
        return value

    def operand(self, env: dict, decision, pos: int, v):
        """Operand ``pos`` (value or literal ``v``) of a node, resharded to the spec its
        decision requires (where the planned spec differs)."""
        if not isinstance(v, int):
            return v.val
        want = decision.in_specs[pos] if decision is not None else None
        if want is None or want == self.planned[v]:
            return env[v]
        return self._through_steps(env[v], self.planned[v], want)

    def reshard_to(self, env: dict, v, want: Spec):
        """Value ``v`` resharded to ``want`` and pinned there (a value leaving a region)."""
        if not isinstance(v, int):
            return v.val
        return self.constrain(self._through_steps(env[v], self.planned[v], want), want)

    def _entering(self, env: dict, index: int):
        """What border node ``index`` reads from outside its region, resharded as planned."""
        return self.operand(env, self.decisions[index], 0, self.graph.nodes[index].invars[0])

    def _bind_pinned(self, env: dict, node_indices, values) -> None:
        """Binds each node's single output to its value, pinned to the node's output spec."""
        for i, value in zip(node_indices, values):
            env[self.graph.nodes[i].outvars[0]] = self.constrain(
                value, self.decisions[i].out_specs[0])

    # Nodes.

    def eval_nodes(self, env: dict, node_indices, deferred: DeferredReductions | None = None,
                   overrides: dict | None = None, level: int = -1):
        """Evaluates ``node_indices`` into ``env``. A region directly inside ``level`` (a
        region index, -1: top) runs whole at its last node; its other nodes are skipped."""
        for index in node_indices:
            r = self.region_at(index, level)
            if r == -1:
                outs = self._node_outputs(env, index, deferred, overrides)
                env.update(zip(self.graph.nodes[index].outvars, outs))
            elif index == self.graph.loops[r].last:
                run = self._run_cond if self.graph.loops[r].branches else self._run_loop
                run(env, r, overrides)

    def region_at(self, index: int, level: int) -> int:
        """The region directly inside ``level`` (a region index, -1: top) holding ``index``."""
        r = self.inner[index]
        while r != -1 and self.graph.loops[r].parent != level:
            r = self.graph.loops[r].parent
        return r

    def _node_outputs(self, env: dict, index: int, deferred, overrides):
        """The outputs of one node: from its override, as partial sums when its reduction is
        deferred (or it carries deferred partial sums), else from the planned operator."""
        node, decision = self.graph.nodes[index], self.decisions.get(index)
        if overrides and index in overrides:  # e.g. a micro-batch's slice of random bits
            invals = [self.operand(env, decision, pos, v) for pos, v in enumerate(node.invars)]
            return overrides[index](*invals)
        if deferred is not None and index in deferred.carriers:
            params = bind_params(node.primitive, node.params)
            outs = bind_over_partials(node, params, env, deferred.partial_values)
            if not is_transparent(node.primitive):
                deferred.partial_values.update(node.outvars)
            return outs
        invals = [self.operand(env, decision, pos, v) for pos, v in enumerate(node.invars)]
        if deferred is not None and index in deferred.reductions:
            outs = [emit_partial_result(node, decision, invals, self.jax_mesh)]
            deferred.partial_values.update(node.outvars)
            return outs
        return self._bind_planned(node, decision, invals)

    def _bind_planned(self, node, decision, invals) -> list:
        """Binds the operator (a reduce-scatter strategy literally) and pins its outputs: an
        anchor's to its decided specs, a value some consumer reshards to its planned spec."""
        if decision is not None and scatter_collective(decision) is not None:
            outs = [emit_reduce_scatter(node, decision, invals, self.jax_mesh)]
        else:
            outs = node.primitive.bind(*invals, **bind_params(node.primitive, node.params))
            outs = outs if node.primitive.multiple_results else [outs]
        if decision is not None and decision.anchor:
            outs = [self.constrain(o, s) for o, s in zip(outs, decision.out_specs)]
        return [self.constrain(o, self.planned[v]) if v in self.to_pin else o
                for o, v in zip(outs, node.outvars)]

    # Regions.

    def _run_loop(self, env: dict, r: int, overrides) -> None:
        """Emits loop region ``r`` as one scan (a while loop when it has a fixed trip count)
        and binds its final carry and stacked outputs, pinned to their planned specs."""
        loop: LoopRegion = self.graph.loops[r]
        enter = loop.carry_enter + loop.slice_enter
        init = [self._entering(env, i) for i in enter]
        body = self._loop_body(env, r, enter, overrides)
        if loop.cond_jaxpr is not None:
            cond_args = [self._read(env, v) for v in loop.cond_consts]
            cond = jaxpr_as_fun(loop.cond_jaxpr)
            final = jax.lax.while_loop(lambda c: cond(*cond_args, *c)[0],
                                       lambda c: body(c, [])[0], init)
            ys = []
        else:
            n_carry = len(loop.carry_enter)
            final, ys = jax.lax.scan(body, init[:n_carry], init[n_carry:], length=loop.length,
                                     reverse=loop.reverse, unroll=loop.unroll)
        self._bind_pinned(env, loop.carry_exit + loop.stack_exit, list(final) + list(ys))

    def _loop_body(self, env: dict, r: int, enter: list[int], overrides) -> Callable:
        """The body of loop region ``r``: binds carry and slices to the ``enter`` nodes, runs
        the body nodes, and reshards the new carry to the spec it entered with (in its dtype)
        and each stacked output to the spec its exit node requires."""
        loop: LoopRegion = self.graph.loops[r]
        border = set(enter + loop.carry_exit + loop.stack_exit + loop.invariant_enter)
        body_nodes = [i for i in range(loop.first, loop.last + 1) if i not in border]
        carry_specs = [self.decisions[i].out_specs[0] for i in loop.carry_enter]
        stacked = [(self.graph.nodes[i].invars[0], self.decisions[i].in_specs[0])
                   for i in loop.stack_exit]

        def body(carry, xs):
            body_env = dict(env)
            self._bind_pinned(body_env, enter, list(carry) + list(xs))
            self.eval_nodes(body_env, body_nodes, overrides=overrides, level=r)
            new_carry = [self.reshard_to(body_env, v, spec)
                         for v, spec in zip(loop.carry_out, carry_specs)]
            new_carry = [jax.numpy.asarray(c, dtype=old.dtype) for c, old in zip(new_carry, carry)]
            return new_carry, [self.reshard_to(body_env, v, spec) for v, spec in stacked]

        return body

    def _run_cond(self, env: dict, r: int, overrides) -> None:
        """Emits cond region ``r`` as one ``jax.lax.switch`` over its branches and binds its
        results, pinned to their planned specs."""
        region: LoopRegion = self.graph.loops[r]
        index = self._read(env, self.graph.nodes[region.index_enter].invars[0])
        operands = [self._entering(env, i) for i in region.carry_enter]
        branches = [self._cond_branch(env, r, k, index, overrides)
                    for k in range(len(region.branches))]
        results = jax.lax.switch(index, branches, *operands)
        self._bind_pinned(env, region.carry_exit, results)

    def _cond_branch(self, env: dict, r: int, k: int, index, overrides) -> Callable:
        """Branch ``k`` of cond region ``r``: binds the index and operands, runs the branch's
        nodes, and reshards each result to the spec its exit node requires from branch ``k``,
        in the exit value's dtype."""
        region: LoopRegion = self.graph.loops[r]
        nodes = self.graph.nodes
        index_out = nodes[region.index_enter].outvars[0]
        exits = [(self.decisions[i].in_specs[k + 1], self.graph.avals[nodes[i].outvars[0]].dtype)
                 for i in region.carry_exit]

        def run(*ops):
            body_env = dict(env)
            body_env[index_out] = index
            self._bind_pinned(body_env, region.carry_enter, ops)
            self.eval_nodes(body_env, region.branches[k], overrides=overrides, level=r)
            return [jax.numpy.asarray(self.reshard_to(body_env, v, spec), dtype=dtype)
                    for v, (spec, dtype) in zip(region.branch_outs[k], exits)]

        return run


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
