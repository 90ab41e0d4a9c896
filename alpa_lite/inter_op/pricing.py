"""Pricing layers and stages of a pipeline: the one cost path of `parallelize` and simulation.

Input: the traced step graph with layer markers, candidate (submesh, logical view) pairs with
their `LogicalMesh`es, and the number of micro-batches. Output: a `LayerPrice` per (layer,
submesh, view) and, through the stage DP, a `StageAssignment`.

What a layer costs (`price_layer`), from the intra-op ILP's plan of the layer's forward and
backward operators on the mesh:

- ``compute_s``: forward + backward compute of one micro-batch per device;
- ``comm_s``: collectives run per micro-batch (activations);
- ``grad_sync_s``: collectives that only feed gradients: the runtime defers them and runs them
  once per step (ShardParallel and pipelines alike), so they are priced once, not k times;
- ``state_bytes``: parameters + their gradients + optimizer state per device (the optimizer's
  bytes per parameter byte are measured from the step's own arguments);
- ``activation_bytes``: what the forward pass keeps for the backward pass, per micro-batch
  (the layer markers' copies of parameters are held once, so they count in ``state_bytes``);
- ``boundary_bytes``: the layer's output activations (whole tensors), what a stage boundary
  after it sends forward (and its gradient backward) per micro-batch;
- ``apply_s``: the optimizer update of its parameters (the apply operators the pipeline
  runtime places with the layer), planned by the ILP on its own, once per step.

A stage of layers ``a..b`` takes ``sum(compute_s + comm_s) + launches`` per micro-batch, plus
the transfer of its boundary, and ``sum(grad_sync_s + apply_s)`` once per step; a pipeline of
stage times ``t_s`` and once-per-step times ``o_s`` takes
``sum(t_s) + (k - 1) * max(t_s) + max(o_s)``, and on hosts whose devices share compute
(simulated CPU devices) at least the sum of the work of the stages on one host
(`pipeline_step_time_s`). Memory of a
stage: ``state + in_flight * activations``, where 1F1B keeps ``min(S - s, k)`` micro-batches
in flight on stage ``s`` and GPipe all ``k``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Sequence

import numpy as np

from alpa_lite.pipeline_model.schedules import build_schedule, in_flight_micro_batches
from alpa_lite.pipeline_model.partition import assign_regions, build_subgraph, partition_pipeline
from alpa_lite.cost import OpClass, estimate_op_cost, operator_class
from alpa_lite.errors import InfeasiblePlanError, InvalidConfigError
from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.once_per_step import gradient_only_nodes, gradient_only_values
from alpa_lite.intra_op.planner import (compute_facts, graph_fingerprint,
                                        solve_planning_problem, unit_compute_seconds)
from alpa_lite.intra_op.problem import InputRole, SpecPolicy, build_planning_problem
from alpa_lite.intra_op.resharding import tensor_bytes
from alpa_lite.intra_op.strategies import spec_shards
from alpa_lite.inter_op.stage_dp import StageProblem, solve_stage_dp
from alpa_lite.markers import layer_boundary_p
from alpa_lite.mesh import LogicalMesh
from alpa_lite.inter_op.assignment import StageAssignment, place_stages
from alpa_lite.plan import value_specs

SubmeshView = tuple[tuple[int, int], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class LayerPrice:
    """What one layer costs on one (submesh, view); see the module docstring."""

    compute_s: float
    comm_s: float
    grad_sync_s: float
    state_bytes: float
    activation_bytes: float
    boundary_bytes: float
    apply_s: float = 0.0
    # compute_s by operator class (`compute_class`), for `alpa_lite.explain`
    compute_by_class: tuple[tuple[str, float], ...] = ()

    @property
    def micro_batch_s(self) -> float:
        return self.compute_s + self.comm_s


def compute_class(primitive) -> str:
    """The breakdown's name for what an operator spends its time on."""
    classes = operator_class(primitive)
    if OpClass.MATMUL in classes:
        return "matmul"
    if OpClass.REDUCTION in classes:
        return "reductions (norms, softmax, losses)"
    if OpClass.ELEMENTWISE in classes or OpClass.FUSED_LAYOUT in classes:
        return "elementwise"
    return "data movement and other"


def _add_classes(*tables, factor: float = 1.0) -> tuple[tuple[str, float], ...]:
    total: dict[str, float] = {}
    for table in tables:
        for name, seconds in table:
            total[name] = total.get(name, 0.0) + seconds * factor
    return tuple(sorted(total.items()))


@dataclasses.dataclass(frozen=True)
class PricingOptions:
    """Solver settings and step facts shared by every layer pricing."""

    solver: str = "auto"
    time_limit_s: float = 60.0
    state_bytes_per_param_byte: float = 4.0  # params + grads + optimizer state
    # positions in the graph's inputs of the parameters: a layer's marked copy of one is held
    # once per step by the runtime, not once per micro-batch in flight
    param_positions: frozenset[int] = frozenset()
    # which strategies the ILP may pick (`SpecPolicy.MEGATRON` prices a named Megatron
    # layout) and, for a policy other than AUTO, the role of each graph input
    policy: SpecPolicy = SpecPolicy.AUTO
    input_roles: tuple[InputRole, ...] = ()
    # micro-batches per step: a layer's ILP weighs the collectives that only feed gradients
    # (run once per step, priced in ``grad_sync_s``) 1 / k, as they are priced
    num_micro_batches: int = 1


def build_layer_nodes(graph: OpGraph, num_layers: int) -> tuple[list[list[int]], list[set[int]]]:
    """Per layer: its operators before the gradient boundary (forward and backward), and the
    forward ones among them."""
    regions = assign_regions(graph, range(len(graph.nodes)))
    boundary = next(n.index for n in graph.nodes if n.name == "grad_boundary")
    nodes = [[i for i, (_, layer) in regions.items() if layer == l and i < boundary]
             for l in range(num_layers)]
    forward = [{i for i in layer if regions[i][0] == "F"} for layer in nodes]
    return nodes, forward


def node_flops(graph: OpGraph, nodes) -> float:
    """The flops of ``nodes`` of ``graph`` (splits a stage's time into forward and backward
    for the timeline)."""
    return sum(estimate_op_cost(graph.nodes[i].primitive, graph.nodes[i].params,
                                [graph.avals[v] if isinstance(v, int) else v.aval
                                 for v in graph.nodes[i].invars],
                                [graph.avals[v] for v in graph.nodes[i].outvars]).flops
               for i in nodes)


def layer_flops(graph: OpGraph, num_layers: int) -> list[tuple[float, float]]:
    """Per layer: (forward flops, forward + backward flops)."""
    nodes, forward = build_layer_nodes(graph, num_layers)
    return [(node_flops(graph, f), node_flops(graph, n)) for n, f in zip(nodes, forward)]


def combine_prices(prices: Sequence[LayerPrice]) -> LayerPrice:
    """Consecutive layers as one (their sums; the boundary is the last layer's)."""
    total = {f: sum(getattr(p, f) for p in prices) for f in (
        "compute_s", "comm_s", "grad_sync_s", "state_bytes", "activation_bytes", "apply_s")}
    return LayerPrice(**total, boundary_bytes=prices[-1].boundary_bytes,
                      compute_by_class=_add_classes(*(p.compute_by_class for p in prices)))


def scale_prices(price: LayerPrice, factor: float) -> LayerPrice:
    """The price at ``factor`` times the micro-batch size: compute, activation comm,
    activations and boundary scale; state, gradient sync and update do not (simulation's
    shortcut)."""
    return dataclasses.replace(price, compute_s=price.compute_s * factor,
                               compute_by_class=_add_classes(price.compute_by_class,
                                                             factor=factor),
                               comm_s=price.comm_s * factor,
                               activation_bytes=price.activation_bytes * factor,
                               boundary_bytes=price.boundary_bytes * factor)


def estimate_state_bytes_per_param_byte(roles: Sequence, avals: Sequence) -> float:
    """(parameters + gradients + optimizer state) bytes per parameter byte, from the step's
    arguments (2 for plain SGD, 3 with momentum, 4 with Adam)."""
    params = sum(tensor_bytes(a) for r, a in zip(roles, avals) if r is InputRole.PARAM)
    state = sum(tensor_bytes(a) for r, a in zip(roles, avals) if r is InputRole.OPT_STATE)
    return 2.0 + (state / params if params else 2.0)


# Memory price levels of the memory-lean layer plans. The plan at level theta minimises the
# ILP's seconds + lambda * (state bytes per device), with lambda = theta * (fastest plan's
# seconds per micro-batch) / (fastest plan's state bytes): theta of the layer's time is worth
# all of its state memory. Each level is a point of the layer's time-memory frontier (a
# Lagrangian relaxation of the memory budget), found by one ILP as fast as the fastest plan's.
LEAN_LEVELS = (0.03, 0.3, 1.0)


class _Layers:
    """What layer pricing reuses across candidates: the graph's users and, per set of
    operators, its sub-graph, their `compute_facts` and its fingerprint (none depends on
    the mesh)."""

    def __init__(self, graph: OpGraph):
        self.graph, self.users, self.subgraphs = graph, graph.users(), {}

    def subgraph(self, nodes: Sequence[int]):
        key = tuple(nodes)
        if key not in self.subgraphs:
            sub, _ = build_subgraph(self.graph, list(nodes), self.users)
            self.subgraphs[key] = (sub, compute_facts(sub), graph_fingerprint(sub))
        return self.subgraphs[key]


def _layer_problem(layers: _Layers, nodes: Sequence[int], mesh: LogicalMesh,
                   options: PricingOptions, intermediate_role: InputRole = InputRole.BATCH):
    """The ILP of ``nodes`` on ``mesh`` (no memory terms: a price counts memory from the
    chosen specs): ``(subgraph, planning problem, input paths, its units' compute
    seconds, the subgraph's fingerprint)``. Under a policy other than
    AUTO the subgraph's inputs get the graph's input roles, and values made by other
    operators ``intermediate_role`` (activations: BATCH; gradients read by the optimizer
    update: PARAM)."""
    graph = layers.graph
    sub, facts, fingerprint = layers.subgraph(nodes)
    roles = [InputRole.PARAM] * len(sub.inputs)
    if options.policy is not SpecPolicy.AUTO:
        position = {v: i for i, v in enumerate(graph.inputs)}
        roles = [options.input_roles[position[v]] if v in position else intermediate_role
                 for v in sub.inputs]
    paths = [f"v{v}" for v in sub.inputs]
    planning = build_planning_problem(sub, mesh, input_roles=roles, input_paths=paths,
                                      policy=options.policy, memory_terms=False)
    return sub, planning, paths, unit_compute_seconds(sub, mesh, planning, facts), fingerprint


def _solve_layer(graph: OpGraph, problem, mesh: LogicalMesh, options: PricingOptions,
                 memory_price: float = 0.0, once_per_step: frozenset[int] = frozenset()):
    """The ILP's plan of a `_layer_problem`. ``memory_price`` (seconds per byte) charges
    each byte of the step's inputs (parameters) a device holds, times the state each
    parameter byte brings (`PricingOptions.state_bytes_per_param_byte`); the collectives
    of the operators ``once_per_step`` (those that only feed gradients:
    `gradient_only_nodes`) count once per step."""
    sub, planning, paths, compute, fingerprint = problem
    inputs = set(graph.inputs)
    price = [memory_price * options.state_bytes_per_param_byte if v in inputs else 0.0
             for v in sub.inputs]
    return solve_planning_problem(
        sub, mesh, planning, paths, solver=options.solver, share_repeated_layers=False,
        time_limit_s=options.time_limit_s, input_memory_price=price,
        once_per_step_nodes=once_per_step,
        num_micro_batches=options.num_micro_batches, unit_compute=compute,
        fingerprint=fingerprint)


def price_layer(graph: OpGraph, nodes: Sequence[int], forward: set[int], mesh: LogicalMesh,
                options: PricingOptions, gradients: set[int],
                update_nodes: Sequence[int] = (), memory_price: float = 0.0) -> LayerPrice:
    """Plans the layer's operators on ``mesh`` with the intra-op ILP and prices the plan
    (the fastest, or with ``memory_price`` a memory-lean one: `_solve_layer`);
    ``update_nodes`` (its parameters' optimizer update, run once per step) are planned and
    priced on their own."""
    return price_layer_levels(graph, nodes, forward, mesh, options, gradients, update_nodes,
                              (memory_price,))[0]


def price_layer_levels(graph: OpGraph, nodes: Sequence[int], forward: set[int],
                       mesh: LogicalMesh, options: PricingOptions, gradients: set[int],
                       update_nodes: Sequence[int], memory_prices: Sequence[float],
                       layers: _Layers | None = None) -> list[LayerPrice]:
    """`price_layer` at each of the increasing ``memory_prices``, from one ILP build. Once
    a plan holds every input split over all of the mesh's devices (the least memory any
    plan can hold) it is the optimum at every higher price too, so it is reused unsolved.
    ``layers``: a `_Layers` of ``graph`` kept across calls."""
    layers = _Layers(graph) if layers is None else layers
    problem = _layer_problem(layers, nodes, mesh, options)
    update_s = 0.0
    if update_nodes:
        update = _solve_layer(graph, _layer_problem(layers, update_nodes, mesh, options,
                                                    InputRole.PARAM), mesh, options)
        update_s = update.compute_s + update.objective
    sub = problem[0]
    once_per_step = frozenset(gradient_only_nodes(sub, gradients))
    inputs = [v for v in sub.inputs if v in set(graph.inputs)]
    prices, least = [], None
    for price in memory_prices:
        if least is not None:
            prices.append(least)
            continue
        plan = _solve_layer(graph, problem, mesh, options, price, once_per_step)
        specs = value_specs(sub, plan)
        prices.append(_layer_price(graph, sub, plan, specs, nodes, forward, mesh, options,
                                   gradients, update_s, once_per_step, layers.users))
        if all(spec_shards(specs[v], mesh) == mesh.num_devices for v in inputs if v in specs):
            least = prices[-1]
    return prices


def _layer_price(graph, sub, plan, specs, nodes, forward, mesh, options, gradients,
                 update_s, grad_only, users) -> LayerPrice:
    """What a layer's ILP plan costs (the module docstring's fields); ``grad_only``:
    `gradient_only_nodes` of ``sub``, ``users``: ``graph.users()``."""
    decisions = {d.index: d for d in plan.nodes}
    grad_sync = sum(decisions[i].comm_s for i in grad_only if i in decisions)
    comm = sum(d.comm_s for d in plan.nodes) - grad_sync
    resharding = max(plan.objective - sum(d.comm_s for d in plan.nodes), 0.0)

    def per_device(values) -> float:
        return float(sum(tensor_bytes(graph.avals[v]) / spec_shards(specs[v], mesh)
                         for v in values if v in specs))

    inputs = set(graph.inputs)
    weights = per_device(v for v in sub.inputs if v in inputs)
    forward_out = {v for i in forward for v in graph.nodes[i].outvars}
    backward = set(nodes) - forward
    kept = {v for v in forward_out if any(u in backward for u in users[v])}
    copies = _parameter_copies(graph, forward, options.param_positions) & kept
    kept -= copies
    leaving = {v for v in forward_out if v in set(sub.outputs) and v not in gradients
               and any(u not in set(nodes) for u in users[v])}
    return LayerPrice(
        compute_s=plan.compute_s, comm_s=comm + resharding, grad_sync_s=grad_sync,
        state_bytes=weights * options.state_bytes_per_param_byte + per_device(copies),
        activation_bytes=per_device(kept),
        boundary_bytes=float(sum(tensor_bytes(graph.avals[v]) for v in leaving)),
        apply_s=float(update_s),
        compute_by_class=_add_classes(
            [(compute_class(sub.nodes[d.index].primitive), d.compute_s) for d in plan.nodes]))


def _parameter_copies(graph: OpGraph, forward: set[int], param_positions) -> set[int]:
    """The layer markers' copies of parameters among the forward operators' outputs."""
    params = {graph.inputs[p] for p in param_positions if p < len(graph.inputs)}
    return {out for i in forward if graph.nodes[i].primitive is layer_boundary_p
            for a, out in zip(graph.nodes[i].invars, graph.nodes[i].outvars)
            if isinstance(a, int) and a in params}


def price_layers(graph: OpGraph, num_layers: int, candidates: Sequence[SubmeshView],
                 mesh_of: Callable[[tuple[int, int], tuple[int, ...]], LogicalMesh],
                 options: PricingOptions, *,
                 progress: Callable[[str], None] | None = None
                 ) -> dict[SubmeshView, list[LayerPrice]]:
    """Every layer priced on every candidate; identical layers (same operators and shapes)
    are priced once per candidate. A layer's optimizer update is the apply part the pipeline
    runtime would place with it if every layer were a stage (`partition_pipeline`).
    ``progress`` is called with a description after each candidate."""
    return _price_candidates(graph, num_layers, candidates, mesh_of, options, (0.0,), None,
                             progress)[0.0]


class LayerPricer:
    """Prices the layers of one traced graph on candidate (submesh, view) pairs; identical
    layers (same operators and shapes) are priced once per candidate."""

    def __init__(self, graph: OpGraph, num_layers: int,
                 mesh_of: Callable[[tuple[int, int], tuple[int, ...]], LogicalMesh],
                 options: PricingOptions):
        self.graph, self.mesh_of, self.options = graph, mesh_of, options
        self.nodes, self.forward = build_layer_nodes(graph, num_layers)
        self.gradients = gradient_only_values(graph)
        self.layers = _Layers(graph)
        self.updates = layer_update_nodes(graph, num_layers)

        def signature(indices):
            return tuple((graph.nodes[i].name, tuple(str(graph.avals[v]) for v in
                                                     graph.nodes[i].outvars)) for i in indices)

        self.signatures = [(signature(n), signature(u)) for n, u in zip(self.nodes,
                                                                       self.updates)]

    def price(self, candidate: SubmeshView, levels: Sequence[float] = (0.0,),
              fastest: Sequence[LayerPrice] | None = None) -> list[list[LayerPrice]]:
        """Per level of ``levels`` (increasing), the layers' prices on ``candidate``: level 0
        the fastest plans, a level > 0 the memory-lean plans at that memory price relative
        to ``fastest`` (the candidate's fastest layer prices; `memory_price`)."""
        shape, view = candidate
        mesh = self.mesh_of(shape, view)
        cache: dict = {}
        layers = []
        for l, (nodes, forward, update) in enumerate(zip(self.nodes, self.forward,
                                                         self.updates)):
            if self.signatures[l] not in cache:
                prices = [memory_price(level, [fastest[l]]) if level else 0.0
                          for level in levels]
                cache[self.signatures[l]] = price_layer_levels(
                    self.graph, nodes, forward, mesh, self.options, self.gradients, update,
                    prices, self.layers)
            layers.append(cache[self.signatures[l]])
        return [[layer[i] for layer in layers] for i in range(len(levels))]


def price_table(priced: Iterable[tuple[SubmeshView, list[list[LayerPrice]]]],
                levels: Sequence[float], progress: Callable[[str], None] | None = None
                ) -> dict[float, dict[SubmeshView, list[LayerPrice]]]:
    """``{level: {candidate: layer prices}}`` from ``(candidate, `LayerPricer.price`)``
    pairs (taken in order; ``progress`` is called after each)."""
    table: dict = {level: {} for level in levels}
    for (shape, view), per_level in priced:
        for level, prices in zip(levels, per_level):
            table[level][(tuple(shape), tuple(view))] = prices
        if progress is not None:
            progress(f"priced layers on {shape} as {view}" + (
                f", memory prices {', '.join(map(str, levels))}" if any(levels) else ""))
    return table


def _price_candidates(graph, num_layers, candidates, mesh_of, options, levels, fastest,
                      progress) -> dict[float, dict[SubmeshView, list[LayerPrice]]]:
    pricer = LayerPricer(graph, num_layers, mesh_of, options)
    return price_table(((c, pricer.price(c, levels, None if fastest is None else fastest[
        (tuple(c[0]), tuple(c[1]))])) for c in candidates), levels, progress)


# the memory-lean layer plans are priced only when the budget costs more than this share of
# the fastest plan's time: they can win back at most that (a plan is never faster than the
# fastest regardless of memory), and pricing them triples a search's ILP work
LEAN_WORTH = 0.02


def memory_binds(fits: bool, step_time_s: float, unconstrained_step_time_s: float) -> bool:
    """Whether the memory budget costs a plan more than `LEAN_WORTH` of its time (or nothing
    fits it): only then may the memory-lean layer plans (`price_lean_layers`) make the plan
    worth their pricing, so only then are they priced."""
    return not fits or step_time_s > unconstrained_step_time_s * (1 + LEAN_WORTH)


def memory_price(level: float, fastest: Sequence[LayerPrice]) -> float:
    """Seconds per byte of state at memory price ``level`` (`LEAN_LEVELS`) for layers whose
    fastest plans are ``fastest``: ``level * their seconds per micro-batch / their state
    bytes`` (0 when they hold no state)."""
    state = sum(p.state_bytes for p in fastest)
    return level * sum(p.micro_batch_s for p in fastest) / state if state > 0 else 0.0


def price_lean_layers(graph: OpGraph, num_layers: int, candidates: Sequence[SubmeshView],
                      mesh_of: Callable[[tuple[int, int], tuple[int, ...]], LogicalMesh],
                      options: PricingOptions, fastest: dict[SubmeshView, list[LayerPrice]],
                      levels: Sequence[float] = LEAN_LEVELS,
                      progress: Callable[[str], None] | None = None
                      ) -> dict[float, dict[SubmeshView, list[LayerPrice]]]:
    """Each layer's memory-lean plan at every memory price level of ``levels`` (see
    `LEAN_LEVELS`), its memory priced relative to its plan in ``fastest`` (`price_layers`'
    result): ``{level: prices}``. One ILP build per layer and candidate serves all levels."""
    return _price_candidates(graph, num_layers, candidates, mesh_of, options,
                             tuple(sorted(levels)), fastest, progress)


def layer_update_nodes(graph: OpGraph, num_layers: int) -> list[list[int]]:
    """Per layer: the operators after the gradient boundary that update its parameters."""
    if not any(n.name == "grad_boundary" for n in graph.nodes):
        return [[] for _ in range(num_layers)]
    partition = partition_pipeline(graph, [], list(range(num_layers)), num_layers)
    boundary = partition.boundary.index
    return [[i for i in partition.mesh_nodes[l] if i > boundary] for l in range(num_layers)]


def estimate_stage(prices: Sequence[LayerPrice], mesh: LogicalMesh, link_s_per_byte: float,
                   link_alpha_s: float, last: bool) -> tuple[float, float, float]:
    """(seconds per micro-batch, gradient-sync seconds per step, update seconds per step) of
    a stage of ``prices``: its layers, two program launches (forward, backward) and, unless it
    is the last stage, sending its boundary forward and receiving its gradient back; once per
    step its gradient sync, and its optimizer update with one more launch."""
    launch = getattr(mesh, "launch_latency_s", 0.0)
    transfer = 0.0 if last else 2 * (link_alpha_s + prices[-1].boundary_bytes * link_s_per_byte)
    return (sum(p.micro_batch_s for p in prices) + 2 * launch + transfer,
            sum(p.grad_sync_s for p in prices), sum(p.apply_s for p in prices) + launch)


# Under ZB-H1 a backward runs as an input-gradient and a weight-gradient task. Each weight's
# matmul runs once in the forward, once for the input gradient and once for the weight
# gradient, with equal flops, so a layer's time splits forward : input gradient : weight
# gradient = 1 : 1 : 1; a rematerialized layer's backward also recomputes its forward, 1 : 2 : 1.
_TASK_SHARES = {False: (1 / 3, 1 / 3, 1 / 3), True: (1 / 4, 1 / 2, 1 / 4)}


def task_durations(stage_s: Sequence[float], schedule, remat: Sequence[bool] | None = None
                   ) -> tuple[list[float], list[float], list[float]]:
    """Per model chunk (model order): forward, backward and weight-gradient seconds of one
    micro-batch, from per-stage seconds. A stage's time is shared evenly among its chunks
    (``schedule.virtual_stages``); the weight-gradient part is its own task only when the
    schedule splits backwards (ZB-H1)."""
    n, v = schedule.num_stages, schedule.virtual_stages
    forward, backward, weight = [], [], []
    for c in range(n * v):
        t = stage_s[c % n] / v
        f, b, w = _TASK_SHARES[bool(remat and remat[c % n])]
        if not schedule.splits_backward:
            b, w = b + w, 0.0
        forward.append(t * f)
        backward.append(t * b)
        weight.append(t * w)
    return forward, backward, weight


def pipeline_step_time_s(stage_micro_batch_s: Sequence[float], once_per_step_s: Sequence[float],
                         k: int, *, stage_hosts: Sequence[Sequence[int]] | None = None,
                         schedule: str = "1f1b", virtual_stages: int = 1,
                         remat: Sequence[bool] | None = None) -> float:
    """Fill and drain once, then ``k - 1`` micro-batches at the slowest stage, then the
    stages' once-per-step work (gradient sync and optimizer update, side by side).

    That is GPipe's and 1F1B's step. The interleaved and ZB-H1 schedules are run on a
    timeline instead (`alpa_lite.timeline.simulate_timeline`, tasks timed by
    `task_durations`): their fill and drain depend on the order of the tasks.

    With ``stage_hosts`` (per stage, the hosts it runs on, for hosts whose devices share
    compute: `ClusterSpec.shared_host_compute`), stages of one host take turns, so the step
    also lasts at least each host's whole work, ``sum(k * t_s + once_s)`` over its stages.

    Example:
        >>> pipeline_step_time_s([1.0, 2.0], [0.5, 0.0], k=4)
        9.5
        >>> pipeline_step_time_s([1.0, 2.0], [0.5, 0.0], k=4, stage_hosts=[[0], [0]])
        12.5
    """
    return _step_from_makespan(
        schedule_makespan_s(stage_micro_batch_s, k, schedule, virtual_stages, remat),
        stage_micro_batch_s, once_per_step_s, k, stage_hosts)


def _step_from_makespan(makespan_s: float, stage_micro_batch_s, once_per_step_s, k: int,
                        stage_hosts) -> float:
    """`pipeline_step_time_s` of a schedule whose compute takes ``makespan_s``."""
    overlapped = makespan_s + max(once_per_step_s, default=0.0)
    host_work: dict[int, float] = {}
    for t, once, hosts in zip(stage_micro_batch_s, once_per_step_s, stage_hosts or ()):
        for host in hosts:
            host_work[host] = host_work.get(host, 0.0) + k * t + once
    return float(max([overlapped, *host_work.values()]))


def schedule_makespan_s(stage_micro_batch_s: Sequence[float], k: int, schedule: str = "1f1b",
                        virtual_stages: int = 1, remat: Sequence[bool] | None = None) -> float:
    """Seconds from the first forward to the last backward of ``k`` micro-batches:
    ``sum(t) + (k - 1) max(t)`` for GPipe and 1F1B, the timeline of the schedule for the
    others (see `pipeline_step_time_s`)."""
    if schedule in ("1f1b", "gpipe"):
        return sum(stage_micro_batch_s) + (k - 1) * max(stage_micro_batch_s)
    from alpa_lite.timeline import simulate_timeline

    built = build_schedule(schedule, len(stage_micro_batch_s), k, virtual_stages)
    forward, backward, weight = task_durations(stage_micro_batch_s, built, remat)
    return max(e.end_s for e in simulate_timeline(built, forward, backward, weight_s=weight))


def shared_stage_hosts(submesh_shapes, devices_per_host: int | None) -> list[list[int]] | None:
    """The hosts of each stage as `assignment.place_stages` places them, for
    `pipeline_step_time_s`; None when hosts do not share compute (``devices_per_host``
    None)."""
    if devices_per_host is None:
        return None
    devices = range(sum(n * m for n, m in submesh_shapes))
    return [sorted({d // devices_per_host for d in placed})
            for placed in place_stages(submesh_shapes, devices, devices_per_host)]


@dataclasses.dataclass(frozen=True)
class StagePrice:
    """One stage's predicted seconds per micro-batch, once-per-step seconds and memory, and
    what they are made of (for `alpa_lite.explain`): per micro-batch its compute by operator
    class, activation collectives, boundary transfers and program launches; its state
    (parameters, gradients, optimizer state) and activations in flight."""

    micro_batch_s: float
    grad_sync_s: float
    apply_s: float
    memory_bytes: float
    compute_by_class: tuple[tuple[str, float], ...] = ()
    comm_s: float = 0.0
    transfer_s: float = 0.0
    launch_s: float = 0.0
    state_bytes: float = 0.0
    activation_bytes: float = 0.0


@dataclasses.dataclass(frozen=True)
class PipelinePrice:
    """A pipeline's stage prices, its predicted step time and its schedule's bubble (the
    makespan beyond ``k`` micro-batches of the slowest stage)."""

    stages: tuple[StagePrice, ...]
    step_time_s: float
    bubble_s: float | None = None


def price_pipeline(spans: Sequence[Sequence[LayerPrice]], meshes: Sequence[LogicalMesh],
                   link: tuple[float, float], k: int, schedule: str,
                   stage_hosts=None, virtual_stages: int = 1,
                   remat: Sequence[bool] | None = None) -> PipelinePrice:
    """The one stage-price assembly: per stage (its layers' prices ``spans[s]`` on
    ``meshes[s]``) `estimate_stage` and its memory, ``state + in flight x activations``
    (`in_flight_micro_batches` of the schedule); the step time `pipeline_step_time_s`.
    ``link`` is the stage-to-stage ``(alpha, seconds per byte)``. An interleaved stage
    launches two programs and moves one boundary each way per chunk; a ZB-H1 stage
    launches three programs."""
    alpha, beta = link
    n, v = len(spans), virtual_stages
    launches = 3 if schedule == "zb-h1" else 2
    stages = []
    for s, (span, mesh) in enumerate(zip(spans, meshes)):
        sends = v - 1 if s == n - 1 else v  # chunk boundaries this stage sends on
        t, g, u = estimate_stage(span, mesh, beta, alpha, True)
        launch = getattr(mesh, "launch_latency_s", 0.0)
        transfer = sends * 2 * (alpha + span[-1].boundary_bytes * beta)
        t += transfer + (launches * v - 2) * launch
        state = sum(p.state_bytes for p in span)
        activations = in_flight_micro_batches(schedule, n, s, k, v) * sum(
            p.activation_bytes for p in span)
        stages.append(StagePrice(
            t, g, u, state + activations,
            compute_by_class=_add_classes(*(p.compute_by_class for p in span)),
            comm_s=sum(p.comm_s for p in span), transfer_s=transfer,
            launch_s=launches * v * launch, state_bytes=state,
            activation_bytes=activations))
    times = [st.micro_batch_s for st in stages]
    makespan = schedule_makespan_s(times, k, schedule, v, remat)
    return PipelinePrice(tuple(stages), _step_from_makespan(
        makespan, times, [st.grad_sync_s + st.apply_s for st in stages], k, stage_hosts),
        makespan - k * max(times))


@dataclasses.dataclass(frozen=True)
class StageSolution:
    """The stage DP's choice (`solve_stages`) and its price."""

    assignment: StageAssignment
    price: PipelinePrice


def solve_stages(priced: dict[SubmeshView, list[LayerPrice]],
                 meshes: dict[SubmeshView, LogicalMesh], *, num_devices: int, k: int,
                 schedule: str, memory_budget_bytes: float | None,
                 link: tuple[float, float], max_num_stages: int | None = None,
                 shared_compute_per_host: int | None = None,
                 remat_priced: dict[SubmeshView, list[LayerPrice]] | None = None,
                 lean_priced: dict[tuple[bool, float], dict[SubmeshView, list[LayerPrice]]]
                 | None = None, device_unit: int = 1) -> StageSolution:
    """Alpa's stage DP over (submesh, view) options: each (submesh, view) pair is one
    option, so views are chosen by time subject to memory inside the DP.
    ``shared_compute_per_host``: devices per host when a host's devices share compute
    (`pipeline_step_time_s`'s ``stage_hosts``).

    With ``remat_priced`` (the same layers traced with every layer rematerialized), each
    (submesh, view) is offered twice, without and with rematerialization, so the DP
    chooses per stage whichever meets the memory budget at the least time.
    ``lean_priced`` offers the layers' memory-lean plans too (`price_lean_layers`), keyed
    ``(False, level)`` for those of ``priced``'s layers, ``(True, level)`` for those of
    ``remat_priced``'s. With either, the assignment's ``remat`` and ``lean`` (a memory price
    level, 0 for the fastest plans) say per stage which prices it was chosen with.
    ``device_unit``: the DP counts devices in units of this many (every option's submesh
    and ``num_devices`` must be multiples of it; whole hosts on big clusters), which
    divides its work by the unit.

    Raises:
        InfeasiblePlanError: no assignment fits ``memory_budget_bytes``; states the smallest
            per-device memory of any assignment.
    """
    tables = {(False, 0.0): priced}  # (remat, memory price level) -> prices
    if remat_priced is not None:
        tables[(True, 0.0)] = remat_priced
    for (remat, level), lean in (lean_priced or {}).items():
        tables[(bool(remat), float(level))] = lean
    columns = [(option, variant) for variant, table in tables.items() for option in table]
    cost, succ, state = _stage_tables(tables, columns, meshes, link, memory_budget_bytes,
                                      schedule, k)
    sizes = [math.prod(s) for (s, _), _ in columns]
    if num_devices % device_unit or any(size % device_unit for size in sizes):
        raise InvalidConfigError(
            f"device_unit={device_unit} must divide the {num_devices} devices and every "
            f"submesh's size; got submesh sizes {sorted(set(sizes))}. Pass device_unit=1.")
    problem = StageProblem(num_layers=cost.shape[0], num_devices=num_devices // device_unit,
                           num_micro_batches=k,
                           submesh_sizes=tuple(size // device_unit for size in sizes),
                           stage_cost_s=cost,
                           max_n_succ_stages=None if memory_budget_bytes is None else succ)
    try:
        solution = solve_stage_dp(problem, max_num_stages=max_num_stages)
    except InfeasiblePlanError:
        if memory_budget_bytes is None:
            raise
        need = float(np.min(state[np.isfinite(cost)])) if np.isfinite(cost).any() else math.nan
        raise InfeasiblePlanError(
            f"No pipeline plan fits the memory budget of {memory_budget_bytes / 2**30:.3g} GiB "
            f"per device with {k} micro-batches ({schedule}); even the lightest stage needs "
            f"about {need / 2**30:.3g} GiB. Raise memory_budget_per_device, use more devices, "
            "fewer micro-batches in flight (1F1B instead of GPipe), or a smaller batch.",
            budget_bytes=memory_budget_bytes, min_bytes=need) from None
    chosen = [columns[j] for _, _, j in solution.stages]
    spans = [tables[variant][option][start:end + 1]
             for (start, end, _), (option, variant) in zip(solution.stages, chosen)]
    price = price_pipeline(spans, [meshes[option] for option, _ in chosen], link, k, schedule,
                           shared_stage_hosts([o[0] for o, _ in chosen],
                                              shared_compute_per_host))
    layer_to_stage = tuple(stage for stage, (start, end, _) in enumerate(solution.stages)
                           for _ in range(start, end + 1))
    assignment = StageAssignment(
        layer_to_stage, tuple(tuple(o[0]) for o, _ in chosen),
        tuple(tuple(o[1]) for o, _ in chosen), price.step_time_s,
        tuple(st.micro_batch_s for st in price.stages),
        remat=None if remat_priced is None else tuple(v[0] for _, v in chosen),
        lean=None if lean_priced is None else tuple(v[1] for _, v in chosen))
    return StageSolution(assignment, price)


def _stage_tables(tables, columns, meshes, link, budget, schedule: str, k: int):
    """Per (first layer, last layer, option column): the stage's micro-batch seconds
    (`estimate_stage`'s, from prefix sums over the layers), how many stages may follow it
    within the memory budget, and its state + activation bytes."""
    num_layers = len(next(iter(tables[(False, 0.0)].values())))
    alpha, beta = link
    shape = (num_layers, num_layers, len(columns))
    cost, succ, state = np.full(shape, np.inf), np.full(shape, np.inf), np.zeros(shape)
    spans = np.triu(np.ones((num_layers, num_layers), dtype=bool))  # first <= last

    def summed(values):  # [first, last] -> sum of values[first..last]
        prefix = np.concatenate([[0.0], np.cumsum(values)])
        return prefix[None, 1:] - prefix[:-1, None]

    for j, (option, variant) in enumerate(columns):
        layers = tables[variant][option]
        launch = getattr(meshes[option], "launch_latency_s", 0.0)
        # the last stage's transfer is not known here, so every stage pays for sending its
        # boundary (the DP's stage sum then counts one boundary too many: the last layer's,
        # which carries the loss only)
        transfer = np.array([2 * (alpha + p.boundary_bytes * beta) for p in layers])
        transfer[-1] = 0.0
        seconds = summed([p.micro_batch_s for p in layers]) + 2 * launch + transfer[None, :]
        w = summed([p.state_bytes for p in layers])
        a = summed([p.activation_bytes for p in layers])
        cost[..., j] = np.where(spans, seconds, np.inf)
        state[..., j] = np.where(spans, w + a, 0.0)
        succ[..., j] = np.where(spans, _max_successors(w, a, budget, schedule, k), np.inf)
    return cost, succ, state


def _max_successors(state: np.ndarray, activations: np.ndarray, budget: float | None,
                    schedule: str, k: int) -> np.ndarray:
    """How many stages may follow a stage before its in-flight activations overflow."""
    if budget is None:
        return np.full(np.shape(state), np.inf)
    if schedule == "gpipe":
        return np.where(state + k * activations <= budget, np.inf, -1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        limit = np.floor((budget - state) / activations) - 1
    unlimited = (activations <= 0) | (state + k * activations <= budget)
    return np.where(state + activations > budget, -1.0, np.where(unlimited, np.inf, limit))
