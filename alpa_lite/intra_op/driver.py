"""The single-mesh planner: trace the step, solve the sharding ILP on one logical mesh, predict
the step time. ShardParallel, DataParallel and the ZeRO methods all go through
`plan_single_mesh`; a pipeline of one stage does too (`inter_op.driver`).

Phases: choose the mesh (`_mesh_for`), trace (`step.trace_step`), solve (`_solve_fitting`:
with ``remat_layer="auto"``, the fewest rematerialized layers that fit), and build the plan
record (`_plan_record`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Callable, Sequence

from alpa_lite.devices import build_logical_mesh, default_memory_budget, resolve_devices
from alpa_lite.errors import InfeasiblePlanError, InvalidConfigError
from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.once_per_step import (estimate_once_per_step_s, gradient_only_nodes,
                                             gradient_values)
from alpa_lite.intra_op.planner import graph_fingerprint, solve_intra_op
from alpa_lite.mesh import LogicalMesh
from alpa_lite.pipeline_model.partition import count_layers
from alpa_lite.plan import ParallelPlan, ShardingPlan, SingleMeshInfo
from alpa_lite.step import (StepSpec, StepTrace, check_optimizer_state, donated_leaves,
                            find_alias_pairs, input_roles, optimizer_state_mask, trace_step)


@dataclasses.dataclass(frozen=True)
class SingleMeshPlanned:
    """A single-mesh plan and what running it needs: the trace it was made for and the
    devices (empty when planned for a cluster)."""

    trace: StepTrace
    plan: ParallelPlan
    devices: tuple


@dataclasses.dataclass(frozen=True)
class _Problem:
    """What the ILP needs besides the graph: the mesh, budget and how to read the inputs."""

    method: object
    step: StepSpec
    num_args: int
    mesh: LogicalMesh
    opt_state: tuple[bool, ...]
    budget: float | None
    auto_remat: bool


def plan_single_mesh(fun: Callable, args: Sequence, method, step: StepSpec, *, cluster=None,
                     plan: ParallelPlan | None = None,
                     simulate: bool = False) -> SingleMeshPlanned:
    """Traces and plans ``fun(*args)`` with a ShardParallel-family method.

    With ``cluster``, the mesh is priced with the cluster's links, compute and profile
    (executed on the local devices unless ``simulate``: then no devices are used). With
    ``plan`` (a loaded plan), checks that it belongs to the traced function and uses it
    instead of solving.
    """
    start = time.perf_counter()
    devices, mesh = _mesh_for(method, cluster, simulate)
    retrace = functools.partial(trace_step, fun, args, step, method.micro_batches,
                                analyse=not simulate, layer_option=method.layer_option)
    if plan is not None:
        flags = getattr(plan.extra, "remat_layers", None)
        trace = retrace(remat_layers=flags)
        check_plan_matches(plan, trace.graph, mesh)
        return SingleMeshPlanned(trace, plan, tuple(devices))
    opt_state, found = optimizer_state_mask(args, step)
    check_optimizer_state(method, found)
    auto_remat = method.layer_option is not None and method.layer_option.remat_layer == "auto"
    budget = method.memory_budget_per_device
    if auto_remat and budget is None:
        budget = default_memory_budget(cluster, devices)
    problem = _Problem(method, step, len(args), mesh, opt_state, budget, auto_remat)
    trace, sharding = _solve_fitting(retrace, problem)
    warn_plan_fallbacks(sharding)
    return SingleMeshPlanned(trace, _plan_record(problem, trace, sharding, start), tuple(devices))


def _mesh_for(method, cluster, simulate: bool) -> tuple[list, LogicalMesh]:
    """The devices (none when simulating) and the logical mesh of a method."""
    if simulate:
        return [], cluster.logical_mesh((cluster.num_hosts, cluster.devices_per_host),
                                        method.mesh_shape or (cluster.num_devices,))
    devices = resolve_devices(method)
    return devices, build_logical_mesh(method, devices, cluster)


def _solve(problem: _Problem, trace: StepTrace) -> ShardingPlan:
    method, traced = problem.method, trace.traced
    return solve_intra_op(
        trace.graph, problem.mesh, input_roles=input_roles(traced, problem.opt_state),
        input_paths=list(traced.in_paths), policy=method.policy,
        alias_pairs=find_alias_pairs(traced), memory_budget_bytes=problem.budget,
        strict=method.strict,
        donated_inputs=donated_leaves(traced, problem.step.donate_argnums, problem.num_args),
        solver=method.solver, time_limit_s=method.solver_time_limit_s,
        share_repeated_layers=method.share_repeated_layers,
        once_per_step_nodes=frozenset(gradient_only_nodes(trace.graph,
                                                          gradient_values(trace.graph))),
        num_micro_batches=method.micro_batches)


def _solve_fitting(retrace, problem: _Problem) -> tuple[StepTrace, ShardingPlan]:
    """The trace and its plan; with ``remat_layer="auto"`` and a budget the plain trace
    does not fit, the trace with the fewest rematerialized layers that fits."""
    trace = retrace()
    try:
        return trace, _solve(problem, trace)
    except InfeasiblePlanError:
        if not problem.auto_remat:
            raise
    return _fewest_remat_layers(retrace, functools.partial(_solve, problem),
                                count_layers(trace.graph))


def _fewest_remat_layers(retrace, solve, num_layers: int) -> tuple[StepTrace, ShardingPlan]:
    """``remat_layer="auto"`` on one mesh: rematerializes the first ``r`` layers for the
    smallest ``r`` whose plan fits the memory budget (recomputing costs time, so fewer is
    faster). Binary search: if ``r`` layers fit, ``r + 1`` do.

    Raises:
        InfeasiblePlanError: the plan does not fit even with every layer rematerialized.
    """
    def attempt(r):
        trace = retrace(remat_layers=[i < r for i in range(num_layers)])
        try:
            return trace, solve(trace)
        except InfeasiblePlanError as err:
            return err

    best = attempt(num_layers)
    if isinstance(best, InfeasiblePlanError):
        raise InfeasiblePlanError(
            f"Even with all {num_layers} layers rematerialized: {best}",
            budget_bytes=best.budget_bytes, min_bytes=best.min_bytes) from None
    fails, fits = 0, num_layers
    while fits - fails > 1:
        middle = (fails + fits) // 2
        found = attempt(middle)
        if isinstance(found, InfeasiblePlanError):
            fails = middle
        else:
            best, fits = found, middle
    return best


def _plan_record(problem: _Problem, trace: StepTrace, sharding: ShardingPlan,
                 start: float) -> ParallelPlan:
    """The `ParallelPlan` of a solved single-mesh problem, with its predicted step time."""
    k = problem.method.micro_batches
    sync, update = estimate_once_per_step_s(trace.graph, sharding)
    step_s = single_mesh_step_time_s(sharding.compute_s, sharding.objective, sync + update, k,
                                     getattr(problem.mesh, "launch_latency_s", 0.0))
    flags = None if trace.layers is None else tuple(bool(f) for f in trace.layers.remat_layers)
    return ParallelPlan(method=type(problem.method).__name__, num_micro_batches=k,
                        sharding=sharding, plan_time_s=time.perf_counter() - start,
                        extra=SingleMeshInfo(sync, update, step_s, flags))


def single_mesh_step_time_s(compute_s: float, comm_s: float, once_per_step_s: float, k: int,
                            launch_latency_s: float = 0.0) -> float:
    """One step of a single-mesh plan traced at micro-batch size: ``k`` micro-batches of
    compute and activation collectives, the once-per-step part (gradient sync and optimizer
    update, `once_per_step.estimate_once_per_step_s`) once, one program launch."""
    return k * (compute_s + comm_s - once_per_step_s) + once_per_step_s + launch_latency_s


def check_plan_matches(plan: ParallelPlan, graph: OpGraph, mesh: LogicalMesh) -> None:
    """Raises unless ``plan`` was made for this graph on a mesh of this shape."""
    got = graph_fingerprint(graph)
    if plan.sharding is None or plan.sharding.graph_fingerprint != got:
        raise InvalidConfigError(
            f"The loaded plan was made for a different function or argument shapes (plan "
            f"fingerprint {plan.sharding.graph_fingerprint if plan.sharding else None}, this "
            f"call {got}). Plan again with .plan(...) for these arguments.")
    if plan.sharding.mesh.shape != mesh.shape:
        raise InvalidConfigError(
            f"The loaded plan is for mesh {plan.sharding.mesh.shape}, the method asks for "
            f"{mesh.shape}. Use the same mesh_shape as when the plan was made.")


def warn_plan_fallbacks(plan: ShardingPlan) -> None:
    """One warning per plan for a greedy solver fallback or replicated unknown primitives."""
    if plan.solver.get("status") == "fallback":
        warnings.warn(
            f"The sharding ILP found no solution within solver_time_limit_s; the plan is a "
            f"greedy fallback (objective {plan.objective:.3g}), likely slower than optimal. "
            "Raise solver_time_limit_s, or install highspy (solver='highs').", stacklevel=4)
    if plan.fallback_primitives:
        warnings.warn(
            f"No sharding rule for {', '.join(plan.fallback_primitives)}: those operators run "
            "replicated (correct, possibly slower). Register a rule with "
            "alpa_lite.intra_op.strategy_rules.register_strategy_rule, or pass strict=True to "
            "make this an error.", stacklevel=4)
