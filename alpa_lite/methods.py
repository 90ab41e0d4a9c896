"""Which planner plans a method, and which executable runs what it planned: two small tables
that `parallelize` dispatches through (no ``isinstance`` ladders).

A planner is ``plan(fun, args, method, step, *, cluster, plan, simulate) -> planned``; a
planned value carries its ``plan`` (`ParallelPlan`) and what running it needs. A new method
family adds one row to `PLANNERS` (its planner may return an existing planned type, as a
one-stage pipeline returns `SingleMeshPlanned`); a new kind of program adds one row to
`_EXECUTABLES`.
"""

from __future__ import annotations

from typing import Callable

from alpa_lite.config import PipeshardParallel, ShardParallel
from alpa_lite.emit.executable import ShardExecutable
from alpa_lite.emit.pipeline import PipelineExecutable
from alpa_lite.emit.specs import build_jax_mesh
from alpa_lite.errors import InvalidConfigError
from alpa_lite.inter_op.driver import PipelinePlanned, plan_pipeline
from alpa_lite.intra_op.driver import SingleMeshPlanned, plan_single_mesh
from alpa_lite.pipeline_model.schedules import build_schedule
from alpa_lite.step import StepSpec, find_alias_pairs

PLANNERS: dict[type, Callable] = {ShardParallel: plan_single_mesh,
                                  PipeshardParallel: plan_pipeline}


def planner_for(method) -> Callable:
    """The planner of ``method``'s family (the nearest class in `PLANNERS`)."""
    for cls in type(method).__mro__:
        if cls in PLANNERS:
            return PLANNERS[cls]
    raise InvalidConfigError(
        f"Unknown method {method!r}; use ShardParallel, DataParallel, Zero2Parallel, "
        "Zero3Parallel or PipeshardParallel.")


def _single_mesh_executable(planned: SingleMeshPlanned, method, step: StepSpec,
                            signature: tuple) -> ShardExecutable:
    trace = planned.trace
    return ShardExecutable(trace.traced, trace.graph, planned.plan, planned.devices,
                           signature=signature, donate_argnums=step.donate_argnums,
                           micro=trace.micro)


def _pipeline_executable(planned: PipelinePlanned, method, step: StepSpec,
                         signature: tuple) -> PipelineExecutable:
    meshes = [build_jax_mesh(plan.mesh, devices)
              for plan, devices in zip(planned.stage_plans, planned.stage_devices)]
    k = method.num_micro_batches
    trace = planned.trace
    return PipelineExecutable(trace.traced, trace.graph, planned.partition, planned.subgraphs,
                              planned.index_maps, planned.stage_plans, meshes,
                              build_schedule(planned.plan.extra.schedule, len(meshes), k,
                                             planned.plan.extra.virtual_stages), k, trace.micro,
                              signature, planned.donated,
                              frozenset(j for j, _ in find_alias_pairs(trace.traced)))


_EXECUTABLES: dict[type, Callable] = {SingleMeshPlanned: _single_mesh_executable,
                                      PipelinePlanned: _pipeline_executable}


def build_executable(planned, method, step: StepSpec, signature: tuple):
    """The executable of a planned step: one jitted SPMD program, or the pipeline runtime."""
    return _EXECUTABLES[type(planned)](planned, method, step, signature)
