"""Loop and branch regions of an `OpGraph`: the graph-only border primitives, `LoopRegion`.

`alpa_lite.graph` expands a ``scan``, a fixed-trip-count ``while`` and a ``cond`` into a region:
``loop_enter`` nodes (the values entering the body or branches), the body inlined once (or every
branch), and ``loop_exit`` nodes (the values leaving it). This module holds what describes a
region, so that the planner, the emitter and the pipeline builder can share it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from jax.extend import core as jcore
from jax.extend.core import Primitive
from jax.extend.core import primitives as prims

from alpa_lite._jax_compat import while_operand_counts
from alpa_lite.errors import InvalidConfigError


def _graph_only_primitive(name: str) -> Primitive:
    prim = Primitive(name)
    prim.def_abstract_eval(lambda aval, **_: aval)
    return prim


# Graph-only nodes at the border of a scan body (never bound: the emitter re-binds the scan).
# ``kind`` param: "carry" (identity) or "slice" (drops the leading stacked dim) for
# loop_enter; "carry" (identity) or "stack" (adds the leading stacked dim) for loop_exit.
loop_enter_p = _graph_only_primitive("loop_enter")
loop_exit_p = _graph_only_primitive("loop_exit")


@dataclasses.dataclass(frozen=True)
class LoopRegion:
    """A scan expanded into the graph: nodes ``first..last`` (enter nodes, body, exit nodes).

    Attributes:
        first: index of the first ``loop_enter`` node.
        last: index of the last ``loop_exit`` node.
        parent: index of the enclosing region in `OpGraph.loops`, or -1.
        length, reverse, unroll: the scan's parameters.
        carry_enter: node index of each carry's ``loop_enter`` node.
        slice_enter: node index of each stacked operand's ``loop_enter`` node.
        carry_out: body value (or Literal) of each carry after one iteration.
        carry_exit: node index of each carry's ``loop_exit`` node.
        stack_exit: node index of each stacked result's ``loop_exit`` node.
        cond_jaxpr: for a ``while`` loop, its condition (a ClosedJaxpr of cond consts and
            carries); None for a scan.
        cond_consts: for a ``while`` loop, the outer operands (value ids or Literals) of the
            condition's consts; each value id is read by an ``invariant`` loop_enter node.
        invariant_enter: those loop_enter nodes.
        branches: for a ``cond``, the node indices of each branch (its operands' loop_enter
            nodes are ``carry_enter``, its results' ``join`` nodes ``carry_exit``); () else.
        branch_outs: for a ``cond``, each branch's results (value ids or Literals).
        index_enter: for a ``cond``, the ``invariant`` loop_enter node of the branch index.
    """

    first: int
    last: int
    parent: int
    length: int
    reverse: bool
    unroll: Any
    carry_enter: tuple[int, ...]
    slice_enter: tuple[int, ...]
    carry_out: tuple
    carry_exit: tuple[int, ...]
    stack_exit: tuple[int, ...]
    cond_jaxpr: Any = None
    cond_consts: tuple = ()
    invariant_enter: tuple[int, ...] = ()
    branches: tuple[tuple[int, ...], ...] = ()
    branch_outs: tuple[tuple, ...] = ()
    index_enter: int = -1


def remap_loops(loops: tuple[LoopRegion, ...], index_map: dict[int, int]
                ) -> tuple[LoopRegion, ...]:
    """The regions of a sub-graph whose nodes were renumbered by ``index_map`` (old -> new).

    Regions with no node in the sub-graph are dropped.

    Raises:
        InvalidConfigError: when a region is only partly in the sub-graph, or not contiguous
            there (a scan cannot be cut between stages or programs).
    """
    kept, new_index = [], {}
    for r, loop in enumerate(loops):
        span = range(loop.first, loop.last + 1)
        inside = [i in index_map for i in span]
        if not any(inside):
            continue
        new = [index_map.get(i) for i in span]
        if not all(inside) or new != list(range(new[0], new[0] + len(new))):
            raise InvalidConfigError(
                f"A scan of length {loop.length} (graph nodes {loop.first}..{loop.last}) would "
                "be cut between two programs or pipeline stages; expected each scan to stay "
                "whole in one. Put layer boundaries outside the scan (AutoLayerOption cuts "
                "only between top-level equations).")
        m = lambda idx: tuple(index_map[i] for i in idx)  # noqa: E731
        new_index[r] = len(kept)
        kept.append(dataclasses.replace(
            loop, first=new[0], last=new[-1], parent=new_index.get(loop.parent, -1),
            carry_enter=m(loop.carry_enter), slice_enter=m(loop.slice_enter),
            carry_exit=m(loop.carry_exit), stack_exit=m(loop.stack_exit),
            invariant_enter=m(loop.invariant_enter),
            branches=tuple(m(b) for b in loop.branches),
            index_enter=index_map.get(loop.index_enter, -1)))
    return tuple(kept)


def fixed_trip_count(params: dict, invals) -> int | None:
    """The trip count of a ``while`` equation, when it is fixed; else None.

    Recognised: the condition is one ``lt(carry_k, N)`` with a literal N, carry ``k`` enters
    as an integer literal ``a`` and the body returns ``carry_k + 1``: ``max(N - a, 0)`` trips.
    """
    nc, nb = while_operand_counts(params)
    cond, body = params["cond_jaxpr"].jaxpr, params["body_jaxpr"].jaxpr
    if len(cond.eqns) != 1 or cond.eqns[0].primitive is not prims.lt_p:
        return None
    lhs, rhs = cond.eqns[0].invars
    if not isinstance(rhs, jcore.Literal) or lhs not in cond.invars[nc:]:
        return None
    k = cond.invars[nc:].index(lhs)
    start = invals[nc + nb + k]
    if not isinstance(start, jcore.Literal) or not np.issubdtype(np.asarray(start.val).dtype,
                                                                 np.integer):
        return None
    step = next((e for e in body.eqns if body.outvars[k] in e.outvars), None)
    counter = body.invars[nb + k]
    if step is None or step.primitive is not prims.add_p:
        return None
    a, b = step.invars
    one = lambda v: isinstance(v, jcore.Literal) and int(np.asarray(v.val)) == 1  # noqa: E731
    if not ((a is counter and one(b)) or (b is counter and one(a))):
        return None
    return max(int(np.asarray(rhs.val)) - int(np.asarray(start.val)), 0)
