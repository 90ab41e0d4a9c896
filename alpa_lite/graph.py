"""OpGraph: a closed jaxpr flattened into one list of operator nodes.

Input: a `ClosedJaxpr`. Output: `OpGraph`, where every value has an integer id and every node
is one primitive application. Calls whose bodies are ordinary code are inlined (``jit``,
``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat2``); a differentiated remat
becomes an ``optimization_barrier`` node in front of its body, which is exactly how jax lowers
it, so recomputation survives.

A ``scan`` is expanded into a `LoopRegion`: its body is inlined ONCE, whatever its length, between
``loop_enter`` nodes (one per carry: the value entering the body; one per stacked ``xs``
operand: the slice of one iteration) and ``loop_exit`` nodes (the final carry; the stacked
``ys``). Body nodes carry ``repeat`` = the trip count (times the enclosing loops'), so the
planner gives each body operator one strategy used by every iteration and prices it ``repeat``
times. A ``while`` whose trip count is fixed (``i < N`` on an integer carry that starts at a
literal and steps by 1, as ``lax.while_loop(lambda c: c[0] < N, ...)`` traces) is expanded the
same way, its condition kept as a jaxpr. Other ``while`` loops stay one node. A ``cond`` /
``switch`` is expanded into a region too (length 1): one ``loop_enter`` per operand shared by
all branches, every branch inlined, and one ``loop_exit`` ``join`` node per result whose
operands are the branch index and that result of every branch, so operands and results get one
sharding for all branches (planned jointly).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Union

import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from alpa_lite._jax_compat import (
    is_explicit_sharding,
    optimization_barrier_primitive,
    reshard_primitive,
    scan_operand_counts,
    source_line,
    while_operand_counts,
)
from alpa_lite.loop_regions import LoopRegion, fixed_trip_count, loop_enter_p, loop_exit_p

Operand = Union[int, jcore.Literal]

# Calls whose bodies are inlined (their jaxpr param's name).
INLINE_CALLS = {
    prims.jit_p: "jaxpr",
    prims.closed_call_p: "call_jaxpr",
    prims.custom_jvp_call_p: "call_jaxpr",
    prims.custom_vjp_call_p: "call_jaxpr",
}


def _is_sharding_hint(eqn) -> bool:
    """A user's sharding annotation for an explicit-sharding mesh (`jax.sharding.reshard`,
    or a sharding constraint on such a mesh): a hint the plan replaces, so the graph reads
    it as the identity."""
    if eqn.primitive is reshard_primitive():
        return True
    return eqn.primitive is prims.sharding_constraint_p and \
        is_explicit_sharding(eqn.params.get("sharding"))


def _without_explicit_shardings(params: dict) -> dict:
    """``params`` with explicit-mesh output shardings (``out_sharding=`` of `dot_general`,
    `broadcast_in_dim`, `reshape`...) dropped: they name the user's mesh, not the plan's."""
    return {k: None if is_explicit_sharding(v) else v for k, v in params.items()}


@dataclasses.dataclass(slots=True)
class OpNode:
    """One primitive application. ``invars`` are value ids or `Literal`s; ``outvars`` value ids.

    ``repeat``: how many times the node runs per call of the graph (a scan body's trip count).
    """

    index: int
    primitive: Any
    params: dict
    invars: tuple
    outvars: tuple[int, ...]
    name_stack: str = ""
    repeat: int = 1
    source_info: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.primitive.name

    @property
    def source_line(self) -> str:
        """Where the user's code made this operator (``file.py:12 (fn)``), for errors."""
        return source_line(self.source_info)


@dataclasses.dataclass(kw_only=True)
class OpGraph:
    """A flat operator graph.

    Attributes:
        avals: abstract value of every value id.
        inputs: value ids of the flat function inputs, in order.
        consts: (value id, constant) for the jaxpr's closed-over constants.
        nodes: operator nodes in a valid topological (program) order.
        outputs: value ids or literals returned by the function.
        producer: value id -> index of the node producing it, or -1 for inputs and consts.
    """

    avals: list
    inputs: tuple[int, ...]
    consts: tuple[tuple[int, Any], ...]
    nodes: list[OpNode]
    outputs: tuple
    producer: list[int]
    loops: tuple[LoopRegion, ...] = ()

    def innermost_loop(self) -> list[int]:
        """node index -> index into ``loops`` of the innermost region holding it, or -1."""
        inner = [-1] * len(self.nodes)
        for r, loop in enumerate(self.loops):  # parents come before their children
            for i in range(loop.first, loop.last + 1):
                inner[i] = r
        return inner

    def users(self) -> list[list[int]]:
        """value id -> indices of the nodes that read it (each node once)."""
        users: list[list[int]] = [[] for _ in self.avals]
        for node in self.nodes:
            for v in dict.fromkeys(v for v in node.invars if isinstance(v, int)):
                users[v].append(node.index)
        return users

    def last_use(self) -> np.ndarray:
        """value id -> index of the last node reading it (len(nodes) for outputs, -1 if never)."""
        last = np.full(len(self.avals), -1, dtype=np.int64)
        for node in self.nodes:
            for v in node.invars:
                if isinstance(v, int):
                    last[v] = node.index
        for v in self.outputs:
            if isinstance(v, int):
                last[v] = len(self.nodes)
        return last


def build_op_graph(closed_jaxpr: jcore.ClosedJaxpr) -> OpGraph:
    """Flattens ``closed_jaxpr`` into an `OpGraph`, inlining call-like primitives.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda x: jax.jit(lambda y: jnp.sin(y) * 2)(x) + 1
        >>> g = build_op_graph(jax.make_jaxpr(f)(jnp.ones(3)))
        >>> [n.name for n in g.nodes]
        ['sin', 'mul', 'add']
    """
    builder = _GraphBuilder()
    inputs = tuple(builder.new_value(v.aval) for v in closed_jaxpr.jaxpr.invars)
    env = dict(zip(closed_jaxpr.jaxpr.invars, inputs))
    builder.bind_consts(closed_jaxpr.jaxpr.constvars, closed_jaxpr.consts, env)
    outputs = builder.inline(closed_jaxpr.jaxpr, env, "")
    return OpGraph(
        avals=builder.avals,
        inputs=inputs,
        consts=tuple(builder.consts),
        nodes=builder.nodes,
        outputs=tuple(outputs),
        producer=builder.producer,
        loops=tuple(builder.loops),
    )


class _GraphBuilder:
    def __init__(self):
        self.avals: list = []
        self.producer: list[int] = []
        self.nodes: list[OpNode] = []
        self.consts: list[tuple[int, Any]] = []
        self.loops: list[LoopRegion] = []
        self.repeat = 1
        self.source_info = None  # of the equation being inlined
        self.loop_stack: list[int] = []  # open regions, as indices into ``self.loops``

    def new_value(self, aval, producer: int = -1) -> int:
        self.avals.append(aval)
        self.producer.append(producer)
        return len(self.avals) - 1

    def bind_consts(self, constvars, consts, env) -> None:
        for var, value in zip(constvars, consts):
            vid = self.new_value(var.aval)
            self.consts.append((vid, value))
            env[var] = vid

    def read(self, env, atom) -> Operand:
        if isinstance(atom, jcore.Literal):
            return atom
        return env[atom]

    def inline(self, jaxpr: jcore.Jaxpr, env: dict, prefix: str) -> list:
        outer_source = self.source_info
        for eqn in jaxpr.eqns:
            invals = [self.read(env, v) for v in eqn.invars]
            name = _join(prefix, str(eqn.source_info.name_stack))
            self.source_info = eqn.source_info
            outs = self.inline_eqn(eqn, invals, name)
            self.source_info = outer_source
            for var, val in zip(eqn.outvars, outs):
                env[var] = val
        return [self.read(env, v) for v in jaxpr.outvars]

    def inline_eqn(self, eqn, invals, name: str) -> list:
        if _is_sharding_hint(eqn):
            return invals  # the plan chooses the shardings (see `_is_sharding_hint`)
        param = INLINE_CALLS.get(eqn.primitive)
        if param is not None:
            sub = eqn.params[param]
            sub_env = dict(zip(sub.jaxpr.invars, invals))
            self.bind_consts(sub.jaxpr.constvars, sub.consts, sub_env)
            return self.inline(sub.jaxpr, sub_env, name)
        if eqn.primitive is prims.remat_p:
            return self.inline_remat(eqn, invals, name)
        if eqn.primitive is prims.scan_p:
            return self.inline_scan(eqn, invals, name)
        if eqn.primitive is prims.cond_p and isinstance(invals[0], int):
            return self.inline_cond(eqn, invals, name)
        if eqn.primitive is prims.while_p:
            trip = fixed_trip_count(eqn.params, invals)
            if trip:
                return self.inline_while(eqn, invals, name, trip)
        return self.add_node(eqn.primitive, _without_explicit_shardings(eqn.params), invals,
                             [v.aval for v in eqn.outvars], name)

    def add_node(self, primitive, params, invals, out_avals, name: str) -> list[int]:
        outvars = tuple(self.new_value(a, len(self.nodes)) for a in out_avals)
        self.nodes.append(OpNode(len(self.nodes), primitive, params, tuple(invals), outvars,
                                 name, self.repeat, self.source_info))
        return list(outvars)

    def inline_scan(self, eqn, invals, name: str) -> list:
        """Inlines the body once between loop_enter and loop_exit nodes (see `LoopRegion`)."""
        p = eqn.params
        n_const, n_carry = scan_operand_counts(p)
        if n_carry + len(invals) - n_const == 0 or p["length"] == 0:
            return self.add_node(eqn.primitive, dict(p), invals,
                                 [v.aval for v in eqn.outvars], name)
        body: jcore.ClosedJaxpr = p["jaxpr"]
        consts, init, xs = invals[:n_const], invals[n_const:n_const + n_carry], \
            invals[n_const + n_carry:]
        body_in = body.jaxpr.invars
        first = len(self.nodes)
        carry_enter, slice_enter, carry_vals, x_vals = [], [], [], []
        for value, var in zip(init, body_in[n_const:n_const + n_carry]):
            carry_enter.append(len(self.nodes))
            carry_vals += self.add_node(loop_enter_p, {"kind": "carry"}, [value], [var.aval], name)
        for value, var in zip(xs, body_in[n_const + n_carry:]):
            slice_enter.append(len(self.nodes))
            x_vals += self.add_node(loop_enter_p, {"kind": "slice"}, [value], [var.aval], name)
        sub_env = dict(zip(body_in, list(consts) + carry_vals + x_vals))
        self.bind_consts(body.jaxpr.constvars, body.consts, sub_env)
        region = len(self.loops)
        self.loops.append(None)  # placeholder: keeps parents before children
        self.loop_stack.append(region)
        outer_repeat, self.repeat = self.repeat, self.repeat * p["length"]
        outs = self.inline(body.jaxpr, sub_env, _join(name, "scan"))
        self.repeat = outer_repeat
        self.loop_stack.pop()
        carry_out, ys = outs[:n_carry], outs[n_carry:]
        carry_exit, stack_exit, results = [], [], []
        for value, var in zip(carry_out, eqn.outvars[:n_carry]):
            carry_exit.append(len(self.nodes))
            results += self.add_node(loop_exit_p, {"kind": "carry"}, [value], [var.aval], name)
        for value, var in zip(ys, eqn.outvars[n_carry:]):
            stack_exit.append(len(self.nodes))
            results += self.add_node(loop_exit_p, {"kind": "stack"}, [value], [var.aval], name)
        self.loops[region] = LoopRegion(
            first=first, last=len(self.nodes) - 1,
            parent=self.loop_stack[-1] if self.loop_stack else -1, length=p["length"],
            reverse=p["reverse"], unroll=p["unroll"], carry_enter=tuple(carry_enter),
            slice_enter=tuple(slice_enter), carry_out=tuple(carry_out),
            carry_exit=tuple(carry_exit), stack_exit=tuple(stack_exit))
        return results

    def inline_remat(self, eqn, invals, name: str) -> list:
        sub: jcore.Jaxpr = eqn.params["jaxpr"]
        prevent_cse = eqn.params.get("prevent_cse", True)
        if isinstance(prevent_cse, bool):
            prevent_cse = (prevent_cse,) * len(invals)
        barrier_in = [v for v, keep in zip(invals, prevent_cse) if keep and isinstance(v, int)]
        if eqn.params.get("differentiated", False) and barrier_in:
            # jax lowers a differentiated remat as optimization_barrier(args) + body; keeping
            # the barrier keeps XLA from merging the recomputation with the forward pass.
            barrier = optimization_barrier_primitive()
            outs = tuple(self.new_value(self.avals[v], len(self.nodes)) for v in barrier_in)
            self.nodes.append(OpNode(len(self.nodes), barrier, {}, tuple(barrier_in), outs, name))
            renamed = dict(zip(barrier_in, outs))
            invals = [renamed.get(v, v) if isinstance(v, int) else v for v in invals]
        sub_env = dict(zip(sub.invars, invals))
        return self.inline(sub, sub_env, _join(name, "checkpoint"))


    def inline_while(self, eqn, invals, name: str, trip: int) -> list:
        """A fixed-trip-count ``while``: like a scan with carries only (see `LoopRegion`)."""
        p = eqn.params
        nc, nb = while_operand_counts(p)
        cond_consts, body_consts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
        body: jcore.ClosedJaxpr = p["body_jaxpr"]
        first = len(self.nodes)
        invariant_enter = []
        for value in cond_consts:
            if isinstance(value, int):
                invariant_enter.append(len(self.nodes))
                self.add_node(loop_enter_p, {"kind": "invariant"}, [value], [self.avals[value]],
                              name)
        carry_enter, carry_vals = [], []
        for value, var in zip(init, body.jaxpr.invars[nb:]):
            carry_enter.append(len(self.nodes))
            carry_vals += self.add_node(loop_enter_p, {"kind": "carry"}, [value], [var.aval], name)
        sub_env = dict(zip(body.jaxpr.invars, list(body_consts) + carry_vals))
        self.bind_consts(body.jaxpr.constvars, body.consts, sub_env)
        region = len(self.loops)
        self.loops.append(None)
        self.loop_stack.append(region)
        outer_repeat, self.repeat = self.repeat, self.repeat * trip
        carry_out = self.inline(body.jaxpr, sub_env, _join(name, "while"))
        self.repeat = outer_repeat
        self.loop_stack.pop()
        carry_exit, results = [], []
        for value, var in zip(carry_out, eqn.outvars):
            carry_exit.append(len(self.nodes))
            results += self.add_node(loop_exit_p, {"kind": "carry"}, [value], [var.aval], name)
        self.loops[region] = LoopRegion(
            first=first, last=len(self.nodes) - 1,
            parent=self.loop_stack[-1] if self.loop_stack else -1, length=trip,
            reverse=False, unroll=1, carry_enter=tuple(carry_enter), slice_enter=(),
            carry_out=tuple(carry_out), carry_exit=tuple(carry_exit), stack_exit=(),
            cond_jaxpr=p["cond_jaxpr"], cond_consts=tuple(cond_consts),
            invariant_enter=tuple(invariant_enter))
        return results


    def inline_cond(self, eqn, invals, name: str) -> list:
        """Every branch inlined between shared operand enters and joint result exits."""
        branches = eqn.params["branches"]
        index, operands = invals[0], invals[1:]
        first = len(self.nodes)
        index_enter = len(self.nodes)
        index_val = self.add_node(loop_enter_p, {"kind": "invariant"}, [index],
                                  [self.avals[index]], name)[0]
        carry_enter, op_vals = [], []
        for value, var in zip(operands, branches[0].jaxpr.invars):
            carry_enter.append(len(self.nodes))
            op_vals += self.add_node(loop_enter_p, {"kind": "carry"}, [value], [var.aval], name)
        region = len(self.loops)
        self.loops.append(None)
        self.loop_stack.append(region)
        branch_nodes, branch_outs = [], []
        for k, branch in enumerate(branches):
            start = len(self.nodes)
            sub_env = dict(zip(branch.jaxpr.invars, op_vals))
            self.bind_consts(branch.jaxpr.constvars, branch.consts, sub_env)
            branch_outs.append(tuple(self.inline(branch.jaxpr, sub_env,
                                                 _join(name, f"branch{k}"))))
            branch_nodes.append(tuple(range(start, len(self.nodes))))
        self.loop_stack.pop()
        carry_exit, results = [], []
        for r, var in enumerate(eqn.outvars):
            carry_exit.append(len(self.nodes))
            joined = [index_val] + [outs[r] for outs in branch_outs]
            results += self.add_node(loop_exit_p, {"kind": "join"}, joined, [var.aval], name)
        self.loops[region] = LoopRegion(
            first=first, last=len(self.nodes) - 1,
            parent=self.loop_stack[-1] if self.loop_stack else -1, length=1, reverse=False,
            unroll=1, carry_enter=tuple(carry_enter), slice_enter=(), carry_out=(),
            carry_exit=tuple(carry_exit), stack_exit=(), invariant_enter=(index_enter,),
            branches=tuple(branch_nodes), branch_outs=tuple(branch_outs),
            index_enter=index_enter)
        return results


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    return f"{prefix}/{name}" if name else prefix


def iter_sub_jaxprs(params: dict) -> Iterator[jcore.Jaxpr]:
    """Every jaxpr held in an equation's params (ClosedJaxprs unwrapped), not recursive."""
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jcore.Jaxpr):
                yield item
