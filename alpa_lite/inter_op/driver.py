"""The pipeline planner (PipeshardParallel), in typed phases:

1. `_trace`: trace the step once with layer markers (`step.trace_step`) -> `StepTrace`;
2. `_context`: devices, link model, memory budget and pricing options -> `_Context`;
3. `choose_stages`: layers -> stages -> (submesh, logical mesh) -> `StageChoice` (uniform,
   manual, a loaded plan's, or the stage DP over layer prices, with rematerialization and
   memory-lean plans when the budget binds; re-traced once with the chosen remat layers);
4. `choose_schedule`: the schedule (1F1B, GPipe, interleaved 1F1B, ZB-H1; ``"auto"``
   prices each) and the layer -> stage map it runs -> `ScheduleChoice`;
5. `_plan_stages`: split the graph into programs per model chunk and plan each stage with the
   intra-op ILP -> `_StagePlans`;
6. `_records`: the `ParallelPlan` with one `StagePlan` per stage -> `PipelinePlanned`.

A pipeline of one stage is planned as ShardParallel on its mesh (`intra_op.driver`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax

from alpa_lite.config import ShardParallel
from alpa_lite.devices import (SimulatedDevice, default_memory_budget, stage_link,
                               stage_mesh_builder)
from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import OpGraph
from alpa_lite.inter_op import assignment as sp
from alpa_lite.inter_op import pricing
from alpa_lite.inter_op.schedule_choice import ScheduleChoice, choose_schedule
from alpa_lite.inter_op.stages import StageChoice, choose_stages
from alpa_lite.intra_op.driver import SingleMeshPlanned, check_plan_matches, plan_single_mesh
from alpa_lite.intra_op.once_per_step import gradient_only_nodes, gradient_only_values
from alpa_lite.intra_op.planner import solve_intra_op
from alpa_lite.intra_op.problem import InputRole
from alpa_lite.mesh import LogicalMesh
from alpa_lite.pipeline_model.partition import (PipelinePartition, boundary_slice,
                                                build_subgraph, count_layers,
                                                partition_pipeline, split_layer_markers)
from alpa_lite.plan import OneStageInfo, ParallelPlan, PipelineInfo, StagePlan
from alpa_lite.step import (StepSpec, StepTrace, donated_leaves, find_alias_pairs, input_roles,
                            optimizer_state_mask, sub_alias_pairs, trace_step, value_name)

# the state a step input brings per byte (a memory price charges it): a parameter has its
# gradient too, optimizer state is itself
_STATE_BYTES_PER_INPUT_BYTE = {InputRole.PARAM: 2.0, InputRole.OPT_STATE: 1.0}


@dataclasses.dataclass(frozen=True)
class PipelinePlanned:
    """A pipeline plan and what running it needs."""

    trace: StepTrace
    plan: ParallelPlan
    partition: PipelinePartition
    subgraphs: tuple
    index_maps: tuple
    stage_plans: tuple
    stage_devices: tuple
    donated: frozenset[int] = frozenset()  # flat input positions whose buffers are reused


@dataclasses.dataclass(frozen=True)
class _Context:
    """Everything the pricing and the stage ILPs need besides the graph."""

    devices: list
    per_host: int
    mesh_of: Callable
    budget: float | None
    roles: dict
    donated: frozenset[int]
    options: pricing.PricingOptions
    link: tuple[float, float]
    shared: int | None


@dataclasses.dataclass(frozen=True)
class _StagePlans:
    partition: PipelinePartition
    subgraphs: tuple
    index_maps: tuple
    plans: tuple
    devices: tuple


def plan_pipeline(fun: Callable, args: Sequence, method, step: StepSpec, *, cluster=None,
                  plan: ParallelPlan | None = None, simulate: bool = False):
    """Traces ``fun`` with layer markers, chooses stages and plans every stage with the
    intra-op ILP on its own logical mesh.

    Layers and stages are priced by `inter_op.pricing` on the links of ``cluster`` when
    given, else of the method's link model. With ``simulate``, no devices are used (the
    cluster's device count). With ``plan`` (a loaded pipeline plan), its layers, stages and
    stage plans are used instead of solving, checked against this trace.

    Returns:
        `PipelinePlanned`, or `SingleMeshPlanned` when the pipeline has one stage.
    """
    start = time.perf_counter()
    trace = _trace(fun, args, method, step, plan, simulate)
    context = _context(method, step, args, trace, cluster, simulate)

    def retrace(**overrides) -> StepTrace:  # the same layers, other flags
        return trace_step(fun, args, step, method.num_micro_batches, **{
            "analyse": not simulate, "layer_option": method.layer_option,
            "layer_starts": trace.layers.starts, **overrides})

    choice = choose_stages(method, trace, context, plan, retrace)
    if choice.assignment.num_stages == 1 and not simulate:
        return _one_stage(fun, args, method, step, choice, context.devices, start, plan,
                          cluster)
    schedule = _schedule(method, choice, context, plan)
    choice = dataclasses.replace(choice, trace=_split_markers(choice.trace, schedule),
                                 assignment=dataclasses.replace(
                                     choice.assignment, layer_to_stage=schedule.layer_to_stage))
    stages = _plan_stages(method, choice, context, plan, schedule)
    return _records(method, choice, context, stages, plan, start, schedule)


def _schedule(method, choice: StageChoice, context: _Context,
              loaded: ParallelPlan | None) -> ScheduleChoice:
    """The schedule: a loaded plan's, or `choose_schedule` over the method's request."""
    assignment = choice.assignment
    if loaded is not None:
        return ScheduleChoice(loaded.extra.schedule, loaded.extra.virtual_stages,
                              assignment.layer_to_stage, None, True, loaded.extra.runner_up)
    options = choice.stage_options
    return choose_schedule(
        method.schedule, method.virtual_stages, assignment,
        lambda s, layer: choice.priced[options[s]][layer],
        [context.mesh_of(*option) for option in options], context.link,
        method.num_micro_batches, context.budget,
        pricing.shared_stage_hosts(assignment.submesh_shapes, context.shared))


def _trace(fun, args, method, step: StepSpec, plan: ParallelPlan | None,
           simulate: bool) -> StepTrace:
    """The step traced with layer markers (a loaded plan's layers, if given)."""
    layers = getattr(plan.extra, "layers", None) if plan is not None else None
    trace = trace_step(fun, args, step, method.num_micro_batches, analyse=not simulate,
                       layer_option=method.layer_option,
                       layer_starts=None if layers is None else layers.starts,
                       remat_layers=None if layers is None else layers.remat_layers)
    if count_layers(trace.graph) == 0:
        raise InvalidConfigError(
            "PipeshardParallel found no layers: compute gradients with alpa_lite.grad or "
            "alpa_lite.value_and_grad inside the step (they insert the layer markers).")
    return trace


def _context(method, step: StepSpec, args, trace: StepTrace, cluster, simulate: bool
             ) -> _Context:
    """Devices, links, budget and the pricing options of this step."""
    if simulate:
        devices = [SimulatedDevice(i) for i in range(cluster.num_devices)]
        per_host = cluster.devices_per_host
    else:
        devices = list(method.devices) if method.devices is not None else list(jax.devices())
        per_host = min(method.devices_per_host or jax.local_device_count(), len(devices))
    graph, traced = trace.graph, trace.traced
    roles = dict(zip(graph.inputs, input_roles(traced, optimizer_state_mask(args, step)[0])))
    donated = donated_leaves(traced, step.donate_argnums, len(args))
    params = frozenset(i for i, v in enumerate(graph.inputs) if roles[v] is InputRole.PARAM)
    state_ratio = pricing.estimate_state_bytes_per_param_byte(
        [roles[v] for v in graph.inputs], [graph.avals[v] for v in graph.inputs])
    if not params <= donated:  # the update writes new parameters and optimizer state beside
        state_ratio = 2 * state_ratio - 1  # the old ones (counted as if always held)
    options = pricing.PricingOptions(
        solver=method.solver, time_limit_s=method.solver_time_limit_s,
        state_bytes_per_param_byte=state_ratio, param_positions=params,
        num_micro_batches=method.num_micro_batches)
    # devices per host when a host's devices share compute (simulated CPU devices)
    shared = per_host if (cluster.shared_host_compute if cluster is not None
                          else devices[0].platform == "cpu") else None
    platform, links = devices[0].platform, (method.mesh_alpha, method.mesh_beta)
    return _Context(devices, per_host, stage_mesh_builder(cluster, platform, links),
                    method.memory_budget_per_device or default_memory_budget(cluster, devices),
                    roles, donated, options,
                    stage_link(cluster, per_host, len(devices), platform, links), shared)


def _split_markers(trace: StepTrace, schedule: ScheduleChoice) -> StepTrace:
    """ZB-H1: the trace with its backward layer markers cut per value
    (`split_layer_markers`), so weight gradients can leave the input-gradient programs."""
    if schedule.schedule != "zb-h1":
        return trace
    graph, index_map = split_layer_markers(trace.graph)
    micro = trace.micro if trace.micro is None else dataclasses.replace(
        trace.micro, random_dims={index_map[i]: d for i, d in trace.micro.random_dims.items()})
    return dataclasses.replace(trace, graph=graph, micro=micro)


def _plan_stages(method, choice: StageChoice, context: _Context,
                 loaded: ParallelPlan | None, schedule: ScheduleChoice) -> _StagePlans:
    """The stages' sub-graphs, devices and intra-op plans (a loaded plan's, checked)."""
    graph, traced, assignment = choice.trace.graph, choice.trace.traced, choice.assignment
    micro = choice.trace.micro
    batch_inputs = [v for v, b in zip(graph.inputs, traced.batch_leaves) if b]
    partition = partition_pipeline(graph, batch_inputs, list(assignment.layer_to_stage),
                                   assignment.num_stages,
                                   micro.random_dims if micro is not None else (),
                                   split_backward=schedule.schedule == "zb-h1")
    aliases = find_alias_pairs(traced)
    position = {v: i for i, v in enumerate(graph.inputs)}
    subgraphs, index_maps, plans = [], [], []
    for s in range(assignment.num_stages):
        nodes = partition.mesh_nodes[s]
        items = ([i for i in nodes if i < partition.boundary.index]
                 + [boundary_slice(partition.boundary, partition.sinks, s, -1)]
                 + [i for i in nodes if i > partition.boundary.index])
        sub, index_map = build_subgraph(graph, items)
        mesh = context.mesh_of(*choice.stage_options[s])
        if loaded is not None:
            plans.append(loaded_stage_plan(loaded, s, sub, mesh))
        else:
            plans.append(_solve_stage(method, choice, context, s, sub, mesh, aliases, position))
        subgraphs.append(sub)
        index_maps.append(index_map)
    devices = sp.place_stages(assignment.submesh_shapes, context.devices, context.per_host)
    return _StagePlans(partition, tuple(subgraphs), tuple(index_maps), tuple(plans),
                       tuple(devices))


def _solve_stage(method, choice: StageChoice, context: _Context, s: int, sub: OpGraph,
                 mesh: LogicalMesh, aliases, position):
    """The intra-op plan of stage ``s`` (its memory-lean price, if the DP chose one)."""
    roles, traced, graph = context.roles, choice.trace.traced, choice.trace.graph
    return solve_intra_op(
        sub, mesh, input_roles=[roles.get(v, InputRole.PARAM) for v in sub.inputs],
        input_paths=[value_name(traced, graph, v) for v in sub.inputs],
        alias_pairs=sub_alias_pairs(graph, sub, aliases), strict=method.strict,
        solver=method.solver, time_limit_s=method.solver_time_limit_s,
        memory_budget_bytes=context.budget, donated_inputs=frozenset(
            i for i, v in enumerate(sub.inputs) if position.get(v) in context.donated),
        input_memory_price=[
            choice.stage_prices[s] * _STATE_BYTES_PER_INPUT_BYTE.get(roles.get(v), 0.0)
            for v in sub.inputs],
        once_per_step_nodes=frozenset(gradient_only_nodes(sub, gradient_only_values(graph))),
        num_micro_batches=method.num_micro_batches)


def _records(method, choice: StageChoice, context: _Context, stages: _StagePlans,
             loaded: ParallelPlan | None, start: float,
             schedule: ScheduleChoice) -> PipelinePlanned:
    """The `ParallelPlan` (the loaded plan's predictions, or the priced stages')."""
    trace, k = choice.trace, method.num_micro_batches
    if loaded is not None:  # nothing is solved again
        records, latency = tuple(loaded.stages), loaded.predicted_step_time_s
    else:
        records, latency = build_stage_records(choice, stages.plans, stages.partition, k,
                                               schedule, context)
    plan = ParallelPlan(
        method="PipeshardParallel", num_micro_batches=k, sharding=None,
        plan_time_s=time.perf_counter() - start, stages=records,
        extra=PipelineInfo(latency, schedule.schedule, trace.layers,
                           count_layers(trace.graph), context.budget,
                           schedule.virtual_stages, schedule.runner_up))
    return PipelinePlanned(trace, plan, stages.partition, stages.subgraphs, stages.index_maps,
                           stages.plans, stages.devices, context.donated)


def build_stage_records(choice: StageChoice, plans, partition, k: int,
                        schedule: ScheduleChoice, context: _Context
                        ) -> tuple[tuple[StagePlan, ...], float]:
    """Per stage: layers, meshes, predicted forward/backward/gradient-sync/update seconds and
    memory from the layer prices (the DP's numbers, `pricing.price_pipeline`); and the
    pipeline's predicted step time."""
    assignment, graph = choice.assignment, choice.trace.graph
    spans = [[choice.priced[choice.stage_options[s]][l] for l in assignment.stage_layers(s)]
             for s in range(assignment.num_stages)]
    price = pricing.price_pipeline(
        spans, [context.mesh_of(*option) for option in choice.stage_options], context.link,
        k, schedule.schedule, pricing.shared_stage_hosts(assignment.submesh_shapes,
                                                         context.shared),
        schedule.virtual_stages, assignment.remat)
    records = []
    for s, (span, stage) in enumerate(zip(spans, price.stages)):
        layers = assignment.stage_layers(s)
        share = _forward_share(partition, graph, s)
        records.append(StagePlan(
            stage=s, layers=tuple(layers), remat=bool(assignment.remat[s]),
            lean=float(assignment.lean[s]) if assignment.lean else 0.0,
            submesh=tuple(assignment.submesh_shapes[s]),
            logical_mesh=tuple(plans[s].mesh.shape), forward_s=stage.micro_batch_s * share,
            backward_s=stage.micro_batch_s * (1 - share), grad_sync_s=stage.grad_sync_s,
            apply_s=stage.apply_s, peak_memory_bytes=stage.memory_bytes, plan=plans[s],
            num_operators=sum(len(p.nodes) for p in partition.compute_programs()
                              if p.mesh == s)))
    return tuple(records), price.step_time_s


def _forward_share(partition, graph: OpGraph, stage: int) -> float:
    """The forward programs' share of the stage's flops (splits its time into forward and
    backward for the timeline)."""
    forward = sum(pricing.node_flops(graph, p.nodes) for p in partition.forward
                  if p.mesh == stage)
    total = forward + sum(pricing.node_flops(graph, p.nodes)
                          for p in partition.backward + partition.weight if p.mesh == stage)
    return forward / total if total > 0 else 0.5


def _one_stage(fun, args, method, step, choice: StageChoice, devices, start,
               loaded: ParallelPlan | None, cluster=None) -> SingleMeshPlanned:
    """A pipeline of one stage is intra-op parallelism on that stage's mesh: plan and run it
    as `ShardParallel` (one jitted program instead of the pipeline runtime), priced on the
    same ``cluster`` as the stages were."""
    assignment = choice.assignment
    num = sp.submesh_devices(assignment.submesh_shapes[0])
    option = (dataclasses.replace(method.layer_option, remat_layer=True)
              if assignment.remat[0] else None)
    shard = ShardParallel(mesh_shape=assignment.logical_shapes[0], devices=tuple(devices[:num]),
                          num_micro_batches=method.num_micro_batches, strict=method.strict,
                          solver=method.solver, solver_time_limit_s=method.solver_time_limit_s,
                          memory_budget_per_device=method.memory_budget_per_device,
                          layer_option=option)
    planned = plan_single_mesh(fun, args, shard, step, plan=loaded, cluster=cluster)
    if loaded is not None:
        return planned
    memory = choice.dp_memory
    plan = dataclasses.replace(
        planned.plan, method="PipeshardParallel", plan_time_s=time.perf_counter() - start,
        extra=OneStageInfo(tuple(assignment.logical_shapes[0]),
                           tuple(assignment.submesh_shapes[0]), option is not None,
                           float(assignment.lean[0]) if assignment.lean else 0.0,
                           None if memory is None else tuple(memory),
                           planned.plan.predicted_step_time_s))
    return dataclasses.replace(planned, plan=plan)


def loaded_stage_plan(plan: ParallelPlan, stage: int, sub: OpGraph, mesh: LogicalMesh):
    """Stage ``stage``'s `ShardingPlan` from a loaded pipeline plan, checked against the
    stage's sub-graph."""
    loaded = plan.stages[stage].plan
    check_plan_matches(ParallelPlan("stage", 1, loaded, 0.0), sub, mesh)
    return loaded
