"""Intra-op planning: OpGraph + LogicalMesh -> ShardingPlan (build the ILP, solve, decode)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from typing import Sequence

import numpy as np

from alpa_lite.cost import (OpClass, compute_dtype_name, estimate_op_cost, is_fused,
                            operator_class)
from alpa_lite.cost.kernels import kernel_nodes
from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.ilp import solve_sharding_problem
from alpa_lite.intra_op.layer_sharing import (build_layer_classes, build_quotient_problem,
                                              detect_layer_family)
from alpa_lite.intra_op.problem import (InputRole, PlanningProblem, SpecPolicy,
                                        build_planning_problem, input_memory_bytes,
                                        price_input_memory)
from alpa_lite.intra_op.strategies import replicated_spec
from alpa_lite.mesh import LogicalMesh
from alpa_lite.plan import NodeDecision, ShardingPlan

logger = logging.getLogger(__name__)

# Below this many ILP groups the full problem solves in about a second: no sharing needed.
_SHARING_MIN_GROUPS = 600


def graph_fingerprint(graph: OpGraph) -> str:
    """A short hash of the graph's operators and shapes; plans are only valid for their graph."""
    digest = hashlib.sha1()
    for vid in graph.inputs:
        digest.update(str(graph.avals[vid]).encode())
    for node in graph.nodes:
        digest.update(node.name.encode())
        for v in node.outvars:
            digest.update(str(graph.avals[v]).encode())
    return digest.hexdigest()[:16]


def solve_intra_op(
    graph: OpGraph,
    mesh: LogicalMesh,
    *,
    input_roles: list[InputRole],
    input_paths: list[str],
    policy: SpecPolicy = SpecPolicy.AUTO,
    alias_pairs: list[tuple[int, int]] = (),
    memory_budget_bytes: float | None = None,
    strict: bool = False,
    solver: str = "auto",
    time_limit_s: float = 60.0,
    share_repeated_layers: bool | None = None,
    donated_inputs: frozenset[int] = frozenset(),
    input_memory_price: Sequence[float] = (),
    once_per_step_nodes: frozenset[int] = frozenset(),
    num_micro_batches: int = 1,
) -> ShardingPlan:
    """Plans the sharding of every operator of ``graph`` on ``mesh``.

    ``share_repeated_layers``: None shares one strategy choice across repeated layers when the
    graph has a layer family and the ILP has at least `_SHARING_MIN_GROUPS` groups; True/False
    force it on/off. ``donated_inputs``: flat input positions donated to the step, whose
    aliased outputs then reuse the input buffers (peak memory counts them once).
    ``input_memory_price``: per flat input, seconds per byte it holds on each device, added
    to the ILP's objective (`price_input_memory`); the plan's ``objective`` reports
    seconds without it. ``once_per_step_nodes`` / ``num_micro_batches``: see
    `solve_planning_problem`.

    Returns:
        A `ShardingPlan` whose ``objective`` is the ILP optimum (collective and resharding
        seconds) and whose ``solver`` dict records the model size and solve time.
    """
    start = time.perf_counter()
    planning = build_planning_problem(
        graph, mesh, input_roles=input_roles, input_paths=input_paths, policy=policy,
        alias_pairs=alias_pairs, memory_budget_bytes=memory_budget_bytes, strict=strict,
        donated_inputs=frozenset(donated_inputs))
    return solve_planning_problem(
        graph, mesh, planning, input_paths, solver=solver, time_limit_s=time_limit_s,
        share_repeated_layers=share_repeated_layers, input_memory_price=input_memory_price,
        once_per_step_nodes=once_per_step_nodes, num_micro_batches=num_micro_batches,
        build_s=time.perf_counter() - start)


def solve_planning_problem(graph: OpGraph, mesh: LogicalMesh, planning: PlanningProblem,
                           input_paths: Sequence[str], *, solver: str = "auto",
                           time_limit_s: float = 60.0,
                           share_repeated_layers: bool | None = None,
                           input_memory_price: Sequence[float] = (),
                           once_per_step_nodes: frozenset[int] = frozenset(),
                           num_micro_batches: int = 1,
                           unit_compute: list[list[float]] | None = None,
                           build_s: float = 0.0, fingerprint: str | None = None
                           ) -> ShardingPlan:
    """`solve_intra_op` of a problem already built (`build_planning_problem`): one build
    serves several memory prices. A problem built without memory terms gives a plan whose
    ``peak_memory_bytes`` is NaN.

    ``once_per_step_nodes`` (operators whose collectives the runtime runs once per step:
    `once_per_step.gradient_only_nodes`) have their collectives weighed
    ``1 / num_micro_batches`` in the objective, as they are priced: a plan for one
    micro-batch of ``k`` otherwise pays for a gradient sync ``k`` times.
    ``unit_compute``: `unit_compute_seconds` of ``planning``, when solved more than once;
    ``fingerprint``: `graph_fingerprint` of ``graph``, when the caller keeps it."""
    start = time.perf_counter()
    compute = unit_compute or unit_compute_seconds(graph, mesh, planning)
    extra = list(compute)  # per unit and strategy: seconds added to the collectives' cost
    if num_micro_batches > 1:
        rebate = 1.0 - 1.0 / num_micro_batches
        for u, unit in enumerate(planning.units):
            if unit.node in once_per_step_nodes:
                extra[u] = [e - rebate * unit.repeat * st.comm_s
                            for e, st in zip(extra[u], unit.strategies)]
    planning = price_input_memory(graph, mesh, with_compute_costs(planning, extra),
                                  input_memory_price)
    problem, group_class, family = planning.problem, None, None
    if share_repeated_layers is not False:
        family = detect_layer_family(graph)
        big = len(problem.node_costs) >= _SHARING_MIN_GROUPS
        if family is not None and (share_repeated_layers or big):
            group_class = build_layer_classes(planning, graph, family)
            problem = build_quotient_problem(problem, group_class)
    build_s += time.perf_counter() - start
    solution = solve_sharding_problem(problem, time_limit_s=time_limit_s, solver=solver)
    choices = solution.choices
    if group_class is not None:
        choices = tuple(choices[c] for c in group_class)
    logger.info("intra-op ILP: %d groups, %d variables, %s in %.2fs (build %.2fs)",
                len(planning.problem.node_costs), solution.num_variables, solution.status,
                solution.solve_time_s, build_s)
    stats = {
        "name": solution.solver, "status": solution.status,
        "solve_time_s": solution.solve_time_s, "build_time_s": build_s,
        "num_variables": solution.num_variables, "num_constraints": solution.num_constraints,
        "num_groups": len(planning.problem.node_costs), "num_units": len(planning.units),
        "num_edges": len(planning.problem.edges), "num_classes": len(problem.node_costs),
        "shared_layer_family": family if group_class is not None else None,
    }
    priced = input_memory_bytes(graph, mesh, planning.input_units, planning.units,
                                planning.member_map, input_memory_price)
    strategies = [planning.member_map[u][choices[g]] for u, g in enumerate(planning.group_of)]
    objective = solution.objective - sum(p * b[choices[planning.group_of[u]]]
                                         for u, b, p in priced) - sum(
        seconds[m] for seconds, m in zip(extra, strategies))
    peak = (solution.peak_memory_bytes
            if planning.problem.memory_terms or planning.problem.memory_pair_terms
            or planning.problem.memory_budget_bytes is not None else math.nan)
    return decode_plan(graph, mesh, planning, choices, max(objective, 0.0), peak, stats,
                       input_paths, compute, fingerprint)


def unit_compute_seconds(graph: OpGraph, mesh: LogicalMesh, planning: PlanningProblem,
                         facts: list | None = None) -> list[list[float]]:
    """Per unit, the compute seconds of each of its strategies (0 for inputs): its
    operator's roofline seconds on one device (`LogicalMesh.compute_time_s`), times the
    unit's repeat.

    The operator's flops and memory bytes are both divided by the strategy's
    ``work_divisor`` (the devices sharing the work); it computes in `compute_dtype_name` of
    its values. Operators XLA fuses into their neighbours (`is_fused`: elementwise ops,
    broadcasts, reshapes) are priced by their flops only: their bytes never reach memory.
    Matmuls (`OpClass.MATMUL`) compute at the mesh's matmul rate, everything else at its
    vector rate (`LogicalMesh.flops_per_s`). Operators that run as kernels of their own
    after fusion (`kernel_nodes`: matmuls, reductions, gathers, and the last operator of
    each fused loop) also pay the mesh's ``op_latency_s``. ``facts``: `compute_facts` of
    ``graph`` (they do not depend on the mesh), when the caller keeps them.
    """
    facts = compute_facts(graph) if facts is None else facts
    seconds = []
    for unit in planning.units:
        if unit.node < 0:
            seconds.append([0.0] * len(unit.strategies))
            continue
        hbm_bytes, dtype, matmul, kernel = facts[unit.node]
        latency = mesh.op_latency_s if kernel else 0.0
        by_divisor: dict[int, float] = {}
        for s in unit.strategies:
            divisor = max(s.work_divisor, 1)
            if divisor not in by_divisor:
                by_divisor[divisor] = unit.repeat * (mesh.compute_time_s(
                    unit.flops / divisor, hbm_bytes / divisor, dtype, matmul=matmul) + latency)
        seconds.append([by_divisor[max(s.work_divisor, 1)] for s in unit.strategies])
    return seconds


def compute_facts(graph: OpGraph) -> list[tuple[float, str, bool, bool]]:
    """Per operator, what `unit_compute_seconds` prices it by, whatever the mesh: its
    memory bytes (0 when fused), compute dtype, whether it is a matmul and whether it runs
    as a kernel of its own (`kernel_nodes`)."""
    kernels = kernel_nodes(graph)
    facts = []
    for node in graph.nodes:
        avals_in = tuple(v.aval if not isinstance(v, int) else graph.avals[v]
                         for v in node.invars)
        avals_out = tuple(graph.avals[v] for v in node.outvars)
        hbm_bytes = 0.0 if is_fused(node.primitive) else estimate_op_cost(
            node.primitive, node.params, avals_in, avals_out).hbm_bytes
        facts.append((hbm_bytes, compute_dtype_name(avals_in, avals_out),
                      OpClass.MATMUL in operator_class(node.primitive), kernels[node.index]))
    return facts


def with_compute_costs(planning: PlanningProblem, compute: list[list[float]]
                       ) -> PlanningProblem:
    """``planning`` whose group costs also count each strategy's compute seconds, so that
    the ILP minimises compute + communication (the time a plan is priced at); strategies
    equal in communication then no longer tie when one splits the work and the other
    does not."""
    costs = [np.array(c, dtype=float) for c in planning.problem.node_costs]
    for u, members in enumerate(planning.member_map):
        costs[planning.group_of[u]] += [compute[u][m] for m in members]
    return dataclasses.replace(
        planning, problem=dataclasses.replace(planning.problem, node_costs=tuple(costs)))


def decode_plan(graph, mesh, planning: PlanningProblem, choices, objective, peak_memory_bytes,
                stats, input_paths, compute: list[list[float]],
                fingerprint: str | None = None) -> ShardingPlan:
    """The `ShardingPlan` of the ILP's ``choices``; ``compute``: `unit_compute_seconds`;
    ``fingerprint``: `graph_fingerprint` (computed when None)."""
    strategies = planning.unit_strategies(choices)
    roots = {}
    for u, g in enumerate(planning.group_of):
        roots.setdefault(g, u)
    nodes, compute_s = [], 0.0  # operators only: launches are priced per program run
    for u, unit in enumerate(planning.units):
        if unit.node < 0:
            continue
        s = strategies[u]
        anchor = roots[planning.group_of[u]] == u or bool(s.collectives) or unit.heavy
        seconds = compute[u][planning.member_map[u][choices[planning.group_of[u]]]]
        nodes.append(NodeDecision(
            index=unit.node, primitive=graph.nodes[unit.node].name, strategy=s.name,
            in_specs=s.in_specs, out_specs=s.out_specs, anchor=anchor, fallback=unit.fallback,
            comm_s=unit.repeat * s.comm_s, compute_s=seconds,
            collectives=tuple((c.kind.value, c.axes, c.num_bytes) for c in s.collectives)))
        compute_s += seconds
    input_specs = tuple(strategies[u].out_specs[0] for u in planning.input_units)
    output_specs = []
    for pos, value in enumerate(graph.outputs):
        if pos in planning.output_units:
            output_specs.append(strategies[planning.output_units[pos]].in_specs[0])
        elif isinstance(value, int):
            unit, idx = planning.owner[value]
            output_specs.append(strategies[unit].out_specs[idx])
        else:
            output_specs.append(replicated_spec(len(value.aval.shape)))
    return ShardingPlan(
        mesh=mesh, input_specs=input_specs, output_specs=tuple(output_specs),
        nodes=tuple(nodes), objective=float(objective), compute_s=compute_s,
        peak_memory_bytes=float(peak_memory_bytes), solver=stats,
        graph_fingerprint=fingerprint or graph_fingerprint(graph),
        input_names=tuple(input_paths))
