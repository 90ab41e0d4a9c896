"""What a sharding plan runs once per step, however many micro-batches: the collectives
that only feed gradients (the runtime defers them) and the optimizer update after the gradient
boundary. Used by the single-mesh planner and by the pipeline's layer prices."""

from __future__ import annotations

from alpa_lite.cost.linearity import Linearity, linearity
from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.problem import is_transparent


def gradient_values(graph: OpGraph) -> set[int]:
    """The values entering the gradient boundary (gradients, loss, aux); none without one."""
    boundary = next((n for n in graph.nodes if n.name == "grad_boundary"), None)
    return set() if boundary is None else {v for v in boundary.invars if isinstance(v, int)}


def gradient_only_nodes(sub: OpGraph, gradients: set[int]) -> set[int]:
    """Sub-graph operators whose every output only feeds gradients (the deferred reductions
    of the runtime: run once per step).

    A value only feeds gradients if it enters the gradient boundary, or if it is used inside
    the sub-graph only, by such operators. Operators come in topological order, so walking
    them backwards sees every consumer before its producer.
    """
    users: dict[int, list[int]] = {}
    for node in sub.nodes:
        for v in node.invars:
            if isinstance(v, int):
                users.setdefault(v, []).append(node.index)
    leaves_sub = set(sub.outputs) - gradients
    result: set[int] = set()

    def only_feeds_gradients(v: int) -> bool:
        if v in gradients:
            return True
        consumers = users.get(v, [])
        return bool(consumers) and v not in leaves_sub and all(u in result for u in consumers)

    for node in reversed(sub.nodes):
        if node.outvars and all(only_feeds_gradients(v) for v in node.outvars):
            result.add(node.index)
    return result


def gradient_only_values(graph: OpGraph) -> set[int]:
    """The values of the whole step that only flow into gradients: every use of them is the
    gradient boundary, a marker whose matching output only flows into gradients, or a linear
    carrier (`cost.linearity`: what the runtime defers reductions through) whose results only
    do. A layer's sub-graph
    cannot tell (a weight gradient may be finished by an operator of another layer: a
    transpose, an accumulation, a layer marker), so layer pricing asks the whole step."""
    users = graph.users()
    outputs = {v for v in graph.outputs if isinstance(v, int)}
    result: set[int] = set()

    def flows_to_gradients(v: int, u: int) -> bool:
        node = graph.nodes[u]
        if node.name == "grad_boundary":
            return True
        if is_transparent(node.primitive) and len(node.invars) == len(node.outvars):
            return all(o in result for i, o in zip(node.invars, node.outvars) if i == v)
        return (linearity(node.primitive) is Linearity.LINEAR_CARRIER
                and all(o in result for o in node.outvars))

    for node in reversed(graph.nodes):
        for v in node.outvars:
            if v not in outputs and users[v] and all(flows_to_gradients(v, u) for u in users[v]):
                result.add(v)
    return result


def estimate_once_per_step_s(graph: OpGraph, plan) -> tuple[float, float]:
    """``(gradient sync, optimizer update)`` seconds of a sharding plan that run once per step,
    however many micro-batches: the collectives that only feed gradients (deferred by the
    runtime), and every operator after the gradient boundary (its compute and collectives)."""
    decisions = {d.index: d for d in plan.nodes}
    sync = sum(decisions[i].comm_s for i in gradient_only_nodes(graph, gradient_values(graph))
               if i in decisions)
    boundary = next((n.index for n in graph.nodes if n.name == "grad_boundary"), None)
    update = 0.0 if boundary is None else sum(d.compute_s + d.comm_s for d in plan.nodes
                                              if d.index > boundary)
    return float(sync), float(update)
