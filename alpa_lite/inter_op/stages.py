"""Choosing a pipeline's stages (phase 3 of `inter_op.driver`): layers -> stages -> (submesh,
logical mesh), by the stage option's rule or a loaded plan, or by the stage DP over layer
prices (`AutoStageOption`):

1. price every layer on every candidate (submesh, view) (`pricing.price_layers`), also
   rematerialized with ``remat_layer="auto"``;
2. solve the stage DP within the memory budget; when the budget costs time (or nothing
   fits), offer the layers' memory-lean plans too and solve again (`_solve_within_budget`);
3. keep the prices each layer's stage was chosen with, and re-trace once with the chosen
   layers rematerialized.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

from alpa_lite.config import AutoStageOption, ManualStageOption, UniformStageOption
from alpa_lite.errors import InfeasiblePlanError, InvalidConfigError
from alpa_lite.inter_op import assignment as sp
from alpa_lite.inter_op import pricing
from alpa_lite.inter_op.stage_dp import enumerate_submesh_shapes
from alpa_lite.pipeline_model.partition import count_layers
from alpa_lite.plan import ParallelPlan
from alpa_lite.step import StepTrace


@dataclasses.dataclass(frozen=True)
class StageChoice:
    """The stages chosen for a trace.

    Attributes:
        trace: the trace the stages run (re-traced with the chosen remat layers).
        assignment: layers -> stages -> (submesh, logical mesh), remat and lean per stage.
        priced: layer prices per (submesh, view) the stages are predicted with (None for a
            loaded plan, which keeps its own predictions).
        stage_prices: per stage, the memory price (seconds per byte of state) its intra-op
            plan is solved with (0: the fastest plan).
        dp_memory: the stage DP's predicted memory per stage (automatic stages only).
    """

    trace: StepTrace
    assignment: sp.StageAssignment
    priced: dict | None
    stage_prices: tuple[float, ...]
    dp_memory: tuple[float, ...] | None = None

    @property
    def stage_options(self) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
        a = self.assignment
        return [(tuple(a.submesh_shapes[s]), tuple(a.logical_shapes[s]))
                for s in range(a.num_stages)]


def choose_stages(method, trace: StepTrace, context, loaded: ParallelPlan | None,
                  retrace: Callable[..., StepTrace]) -> StageChoice:
    """The stages of ``trace``: a loaded plan's, the option's rule, or the stage DP."""
    num_layers, num_devices = count_layers(trace.graph), len(context.devices)
    option = method.stage_option
    if loaded is not None:
        choice = StageChoice(trace, loaded_assignment(loaded, num_layers), None,
                             (0.0,) * len(loaded.stages))
    elif isinstance(option, AutoStageOption):
        choice = _search(method, trace, context, retrace)
    else:
        assign = {UniformStageOption: lambda: sp.assign_uniform(
                      option, num_layers, num_devices, context.per_host),
                  ManualStageOption: lambda: sp.assign_manual(option, num_layers, num_devices)}
        assignment = assign[type(option)]()
        options = sorted({(tuple(assignment.submesh_shapes[s]),
                           tuple(assignment.logical_shapes[s]))
                          for s in range(assignment.num_stages)})
        priced = pricing.price_layers(trace.graph, num_layers, options, context.mesh_of,
                                      context.options)
        choice = StageChoice(trace, assignment, priced, (0.0,) * assignment.num_stages)
    if choice.assignment.remat is None:  # as traced: a stage rematerializes if its layers do
        flags = (choice.trace.layers.remat_layers if choice.trace.layers is not None
                 else ()) or (False,) * num_layers
        a = choice.assignment
        choice = dataclasses.replace(choice, assignment=dataclasses.replace(a, remat=tuple(
            any(flags[l] for l in a.stage_layers(s)) for s in range(a.num_stages))))
    return choice


def _candidates(option: AutoStageOption, num_devices: int, per_host: int) -> list:
    """(submesh, logical view) pairs a stage may use."""
    shapes = option.submesh_shapes or enumerate_submesh_shapes(
        max(num_devices // per_host, 1), per_host)
    return [(tuple(shape), view) for shape in shapes
            if sp.submesh_devices(shape) <= num_devices for view in sp.logical_views(shape)]


def _search(method, trace: StepTrace, context, retrace) -> StageChoice:
    """`AutoStageOption`: the stage DP over layer prices (see the module docstring)."""
    num_layers = count_layers(trace.graph)
    candidates = _candidates(method.stage_option, len(context.devices), context.per_host)
    graphs = {False: trace.graph}
    automatic = trace.layers is not None and trace.layers.automatic
    if method.layer_option.remat_layer == "auto" and not automatic:  # price remat too
        graphs[True] = retrace(analyse=False, layer_option=dataclasses.replace(
            method.layer_option, remat_layer=True)).graph
    tables = {(remat, 0.0): pricing.price_layers(g, num_layers, candidates, context.mesh_of,
                                                 context.options)
              for remat, g in graphs.items()}
    solve = functools.partial(
        pricing.solve_stages, tables[(False, 0.0)], {c: context.mesh_of(*c) for c in candidates},
        num_devices=len(context.devices), k=method.num_micro_batches,
        schedule="gpipe" if method.schedule == "gpipe" else "1f1b",  # others: `schedule_choice`
        memory_budget_bytes=context.budget, link=context.link,
        max_num_stages=method.stage_option.max_num_stages,
        shared_compute_per_host=context.shared, remat_priced=tables.get((True, 0.0)))
    solution = _solve_within_budget(solve, tables, graphs, num_layers, candidates, context)
    return _chosen(solution, tables, trace, graphs, retrace, num_layers)


def _solve_within_budget(solve, tables: dict, graphs: dict, num_layers: int, candidates,
                         context) -> pricing.StageSolution:
    """The stage DP's solution; when the budget costs time (or nothing fits), the layers'
    memory-lean plans are added to ``tables`` and offered too."""
    try:
        solution = solve()
        binds = pricing.memory_binds(True, solution.assignment.predicted_latency_s, solve(
            memory_budget_bytes=None).assignment.predicted_latency_s)
    except InfeasiblePlanError:
        binds = True
    if not binds:
        return solution
    lean = {(remat, level): t for remat, g in graphs.items()
            for level, t in pricing.price_lean_layers(
                g, num_layers, candidates, context.mesh_of, context.options,
                tables[(remat, 0.0)]).items()}
    tables.update(lean)
    return solve(lean_priced=lean)


def _chosen(solution: pricing.StageSolution, tables: dict, trace: StepTrace, graphs: dict,
            retrace, num_layers: int) -> StageChoice:
    """Each layer's prices (those its stage was chosen with), each stage's memory price, and
    the trace with the chosen layers rematerialized."""
    assignment = solution.assignment
    variant = [(bool(assignment.remat and assignment.remat[s]),
                float(assignment.lean[s]) if assignment.lean else 0.0)
               for s in assignment.layer_to_stage]
    priced = {c: [tables[variant[l]][c][l] for l in range(num_layers)]
              for c in tables[(False, 0.0)]}
    stage_prices = [0.0] * assignment.num_stages
    for s, level in enumerate(assignment.lean or ()):  # the stage ILP prices it alike
        chosen = (assignment.submesh_shapes[s], assignment.logical_shapes[s])
        stage_prices[s] = pricing.memory_price(level, [
            tables[(variant[l][0], 0.0)][chosen][l] for l in assignment.stage_layers(s)])
    flags = [remat for remat, _ in variant]
    if len(graphs) > 1 and any(flags):  # trace again with the chosen layers rematerialized
        trace = retrace(remat_layers=flags)
    memory = tuple(st.memory_bytes for st in solution.price.stages)
    return StageChoice(trace, assignment, priced, tuple(stage_prices), memory)


def loaded_assignment(plan: ParallelPlan, num_layers: int) -> sp.StageAssignment:
    """The `StageAssignment` a loaded pipeline plan was made with (checked against the
    number of layers of this trace)."""
    if plan.method != "PipeshardParallel":
        raise InvalidConfigError(
            f"The loaded plan is a {plan.method} plan; PipeshardParallel needs a pipeline plan "
            "(made by a PipeshardParallel method). Use the plan with its own method.")
    if plan.sharding is not None:  # one stage, run as ShardParallel
        extra = plan.extra
        logical = tuple(extra.logical_mesh)
        submesh = tuple(extra.submesh or (1, math.prod(logical)))
        return sp.StageAssignment((0,) * num_layers, (submesh,), (logical,),
                                  remat=(bool(extra.remat),))
    layer_to_stage = [None] * num_layers
    for stage in plan.stages:
        for layer in stage.layers:
            if layer >= num_layers:
                break
            layer_to_stage[layer] = stage.stage
    planned = sum(len(s.layers) for s in plan.stages)
    if None in layer_to_stage or planned != num_layers:
        raise InvalidConfigError(
            f"The loaded pipeline plan has {planned} layers in its stages; this function "
            f"traced to {num_layers}. Plan again for this function (parallelize(...).plan(...)).")
    return sp.StageAssignment(tuple(layer_to_stage), tuple(s.submesh for s in plan.stages),
                              tuple(s.logical_mesh for s in plan.stages))
