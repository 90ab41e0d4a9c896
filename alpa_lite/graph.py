"""OpGraph: a closed jaxpr flattened into one list of operator nodes.

Input: a `ClosedJaxpr`. Output: `OpGraph`, where every value has an integer id and every node
is one primitive application. Calls whose bodies are ordinary code are inlined (``jit``,
``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat2``); a differentiated remat
becomes an ``optimization_barrier`` node in front of its body, which is exactly how jax lowers
it, so recomputation survives. Control flow (``scan``, ``while``, ``cond``) stays one node.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Union

import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from alpa_lite._jax_compat import optimization_barrier_primitive

Operand = Union[int, jcore.Literal]

_INLINE_CALLS = {
    prims.jit_p: "jaxpr",
    prims.closed_call_p: "call_jaxpr",
    prims.custom_jvp_call_p: "call_jaxpr",
    prims.custom_vjp_call_p: "call_jaxpr",
}


@dataclasses.dataclass(slots=True)
class OpNode:
    """One primitive application. ``invars`` are value ids or `Literal`s; ``outvars`` value ids."""

    index: int
    primitive: Any
    params: dict
    invars: tuple
    outvars: tuple[int, ...]
    name_stack: str = ""

    @property
    def name(self) -> str:
        return self.primitive.name


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
    )


class _GraphBuilder:
    def __init__(self):
        self.avals: list = []
        self.producer: list[int] = []
        self.nodes: list[OpNode] = []
        self.consts: list[tuple[int, Any]] = []

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
        for eqn in jaxpr.eqns:
            invals = [self.read(env, v) for v in eqn.invars]
            name = _join(prefix, str(eqn.source_info.name_stack))
            outs = self.inline_eqn(eqn, invals, name)
            for var, val in zip(eqn.outvars, outs):
                env[var] = val
        return [self.read(env, v) for v in jaxpr.outvars]

    def inline_eqn(self, eqn, invals, name: str) -> list:
        param = _INLINE_CALLS.get(eqn.primitive)
        if param is not None:
            sub = eqn.params[param]
            sub_env = dict(zip(sub.jaxpr.invars, invals))
            self.bind_consts(sub.jaxpr.constvars, sub.consts, sub_env)
            return self.inline(sub.jaxpr, sub_env, name)
        if eqn.primitive is prims.remat_p:
            return self.inline_remat(eqn, invals, name)
        outvars = tuple(self.new_value(v.aval, len(self.nodes)) for v in eqn.outvars)
        self.nodes.append(OpNode(len(self.nodes), eqn.primitive, dict(eqn.params),
                                 tuple(invals), outvars, name))
        return list(outvars)

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
