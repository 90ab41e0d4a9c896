"""The end-to-end pipeline, top to bottom: trace -> graph -> cost -> intra-op ILP -> emit.

Each step is a call into the module that owns it; this file only wires them together.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections import defaultdict
from typing import Callable, Sequence

import jax
import numpy as np

from alpa_lite.inter_op import assignment as sp
from alpa_lite.cluster import ClusterSpec
from alpa_lite.config import (AutoStageOption, ManualStageOption, ShardParallel,
                              UniformStageOption)
from alpa_lite.cost import estimate_op_cost
from alpa_lite.emit.executable import ShardExecutable
from alpa_lite.emit.pipeline import PipelineExecutable
from alpa_lite.emit.specs import build_jax_mesh
from alpa_lite.pipeline_model.partition import boundary_slice, build_subgraph, partition_pipeline
from alpa_lite.inter_op import pricing
from alpa_lite.pipeline_model.schedules import build_schedule, in_flight_micro_batches
from alpa_lite.inter_op.stage_dp import enumerate_submesh_shapes
from alpa_lite.errors import InfeasiblePlanError, InvalidConfigError
from alpa_lite.graph import OpGraph, build_op_graph
from alpa_lite.intra_op.planner import graph_fingerprint, solve_intra_op
from alpa_lite.intra_op.problem import InputRole, SpecPolicy
from alpa_lite.layers import build_layer_transform
from alpa_lite.markers import layer_construction
from alpa_lite.mesh import LogicalMesh
from alpa_lite.auto_layers import mark_layers
from alpa_lite.gradient_boundary import has_grad_boundary, mark_gradient_boundary
from alpa_lite.micro_batching import MicroBatchPlan, build_micro_batch_plan
from alpa_lite.plan import ParallelPlan, StagePlan
from alpa_lite.trace import (TracedFunction, abstractify, rebuild_args, split_static_args,
                             trace_function)

# Rough defaults when the user gives no link model: they only scale predicted times; the
# ILP's choices depend on ratios between axes, which are equal here.
_DEFAULT_ALPHA_S = 5e-6
_DEFAULT_BETA_S_PER_BYTE = {"cpu": 1 / 10e9, "gpu": 1 / 100e9, "tpu": 1 / 100e9}
_DEFAULT_PEAK_FLOPS = {"cpu": 5e10, "gpu": 4e14, "tpu": 2e14}


# the state a step input brings per byte (a memory price charges it): a parameter has its
# gradient too, optimizer state is itself
_STATE_BYTES_PER_INPUT_BYTE = {InputRole.PARAM: 2.0, InputRole.OPT_STATE: 1.0}
_INTER_HOST_SLOWDOWN = 4  # inter-host bandwidth is this many times below intra-host


def axes_spanning_processes(devices: Sequence, shape: Sequence[int]) -> tuple[bool, ...]:
    """Per mesh axis: does any group of devices along it hold devices of two processes?"""
    procs = np.array([getattr(d, "process_index", 0) for d in devices]).reshape(tuple(shape))
    return tuple(bool(np.any(procs.min(axis=a) != procs.max(axis=a)))
                 for a in range(len(shape)))


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """How a step function is called: which positional args are static, donated, batch."""

    static_argnums: tuple[int, ...] = ()
    donate_argnums: tuple[int, ...] = ()
    batch_argnums: tuple[int, ...] = (1,)


def resolve_devices(method: ShardParallel, available: Sequence | None = None) -> list:
    """The devices a method runs on (default: the first prod(mesh_shape) devices)."""
    devices = list(method.devices) if method.devices is not None else list(
        available if available is not None else jax.devices())
    wanted = (len(devices) if method.mesh_shape is None
              else math.prod(method.mesh_shape))
    if wanted > len(devices):
        raise InvalidConfigError(
            f"mesh_shape {method.mesh_shape} needs {wanted} devices but only {len(devices)} are "
            "available. Use a smaller mesh, or on CPU simulate more devices with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N (set before importing jax).")
    return devices[:wanted]


def build_logical_mesh(method: ShardParallel, devices: Sequence, cluster=None) -> LogicalMesh:
    """The method's logical mesh over ``devices``.

    With a ``cluster`` (e.g. ``ClusterSpec.from_devices(profile=...)``), its links, compute
    and profile price the mesh: a mesh axis whose device groups span hosts gets the
    inter-host link. Without one, the method's link model, else defaults in which such an
    axis gets a slower inter-host default.
    """
    shape = method.mesh_shape or (len(devices),)
    if cluster is not None and method.mesh_alpha is None and method.mesh_beta is None:
        hosts = len({getattr(d, "process_index", 0) for d in devices})
        mesh = cluster.logical_mesh((hosts, len(devices) // hosts), shape)
        return dataclasses.replace(mesh, memory_per_device_bytes=method.memory_budget_per_device)
    platform = devices[0].platform if devices else "cpu"
    spans = axes_spanning_processes(devices, shape)
    intra_beta = _DEFAULT_BETA_S_PER_BYTE.get(platform, 1e-10)
    alpha = method.mesh_alpha or tuple(_DEFAULT_ALPHA_S * (2 if s else 1) for s in spans)
    beta = method.mesh_beta or tuple(intra_beta * (_INTER_HOST_SLOWDOWN if s else 1)
                                     for s in spans)
    return LogicalMesh(shape=shape, alpha_s=alpha, beta_s_per_byte=beta,
                       memory_per_device_bytes=method.memory_budget_per_device,
                       peak_flops_per_s=_DEFAULT_PEAK_FLOPS.get(platform, 1e12))


def input_roles(traced: TracedFunction, opt_state_leaves: Sequence[bool]) -> list[InputRole]:
    """Batch leaves, optimizer state (see `optimizer_state_mask`) and parameters."""
    roles = []
    for is_batch, is_opt in zip(traced.batch_leaves, opt_state_leaves):
        if is_batch:
            roles.append(InputRole.BATCH)
        elif is_opt:
            roles.append(InputRole.OPT_STATE)
        else:
            roles.append(InputRole.PARAM)
    return roles


def _is_optax_state(node) -> bool:
    return isinstance(node, tuple) and type(node).__module__.split(".")[0] == "optax"


def optimizer_state_mask(args: Sequence, step: StepSpec) -> tuple[tuple[bool, ...], bool]:
    """Per flat dynamic leaf: is it optimizer state? And was any optimizer state found?

    Optimizer state is found by type: every leaf inside an optax state object (the
    NamedTuples that ``tx.init`` returns: ``ScaleByAdamState``, ``TraceState``, ...; plain
    SGD's ``EmptyState`` counts as found, with no leaves). Leaves under a key path containing
    ``opt_state`` count too, for hand-written optimizers.
    """
    dynamic, _, _ = split_static_args(args, step.static_argnums)
    subtrees = jax.tree_util.tree_flatten_with_path(
        tuple(dynamic), is_leaf=_is_optax_state)[0]
    mask, found = [], False
    for path, subtree in subtrees:
        inside = _is_optax_state(subtree) or "opt_state" in jax.tree_util.keystr(path)
        found = found or inside
        mask.extend([inside] * len(jax.tree_util.tree_leaves(subtree)))
    return tuple(mask), found


def check_optimizer_state(method, found: bool) -> None:
    """ZeRO shards optimizer state: it must be found among the arguments."""
    if method.policy in (SpecPolicy.ZERO2, SpecPolicy.ZERO3) and not found:
        raise InvalidConfigError(
            f"{type(method).__name__} shards the optimizer state, but no optimizer state was "
            "found among the arguments (looked for optax state objects, as returned by "
            "tx.init, and key paths containing 'opt_state'). Pass the optax state inside the "
            "step's arguments (e.g. a flax TrainState), or use DataParallel.")


def check_argnums(args: Sequence, step: StepSpec) -> None:
    """Every argnum names an argument of this call."""
    num_args = len(args)
    for name in ("static_argnums", "donate_argnums", "batch_argnums"):
        for i in getattr(step, name):
            if not -num_args <= i < num_args:
                raise InvalidConfigError(
                    f"{name} contains {i} but the function was called with {num_args} "
                    f"positional argument(s). Use indices below {num_args}, e.g. "
                    "batch_argnums=(1,) for step(state, batch) or batch_argnums=(2,) for "
                    "step(params, opt_state, batch).")


def is_key_like(leaf) -> bool:
    """PRNG keys: typed keys (``jax.random.key``) and raw ``uint32[2]`` keys."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == np.uint32 and tuple(leaf.shape) == (2,)


def batch_leaf_mask(args: Sequence, step: StepSpec) -> tuple[bool, ...]:
    """Per flat dynamic leaf: is it batch data, split into micro-batches on dim 0?

    Leaves of the batch arguments are, except PRNG keys and scalars: those go whole to every
    micro-batch. All batch leaves must share their leading (batch) dimension.

    Raises:
        InvalidConfigError: the batch arguments hold no array with a leading dim, or their
            leading dims differ (``batch_argnums`` probably marks the wrong argument).
    """
    dynamic, _, dyn_idx = split_static_args(args, step.static_argnums)
    batch_set = {i % len(args) for i in step.batch_argnums}
    mask, sizes = [], {}
    for pos, arg in enumerate(dynamic):
        for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
            aval = abstractify(leaf)
            is_batch = dyn_idx[pos] in batch_set and aval.ndim >= 1 and not is_key_like(aval)
            mask.append(is_batch)
            if is_batch:
                sizes[f"argument {dyn_idx[pos]}{jax.tree_util.keystr(path)}"] = aval.shape[0]
    if batch_set and not sizes:
        raise InvalidConfigError(
            f"batch_argnums={step.batch_argnums} marks argument(s) {sorted(batch_set)}, which "
            "hold no array with a leading batch dimension (only scalars or keys). Set "
            "batch_argnums to the position of the batch, e.g. batch_argnums=(2,) for "
            "step(params, opt_state, batch), or batch_argnums=() for no batch.")
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{name}: {size}" for name, size in list(sizes.items())[:6])
        raise InvalidConfigError(
            f"The batch arguments (batch_argnums={step.batch_argnums}) have leaves with "
            f"different leading dimensions ({shown}); every batch leaf needs the batch size as "
            "its leading dim. Does batch_argnums mark the batch? E.g. batch_argnums=(2,) for "
            "step(params, opt_state, batch).")
    return tuple(mask)


def warn_plan_fallbacks(plan) -> None:
    """One warning per plan for a greedy solver fallback or replicated unknown primitives."""
    if plan.solver.get("status") == "fallback":
        warnings.warn(
            f"The sharding ILP found no solution within solver_time_limit_s; the plan is a "
            f"greedy fallback (objective {plan.objective:.3g}), likely slower than optimal. "
            "Raise solver_time_limit_s, or install highspy (solver='highs').", stacklevel=3)
    if plan.fallback_primitives:
        warnings.warn(
            f"No sharding rule for {', '.join(plan.fallback_primitives)}: those operators run "
            "replicated (correct, possibly slower). Register a rule with "
            "alpa_lite.intra_op.strategy_rules.register_strategy_rule, or pass strict=True to "
            "make this an error.", stacklevel=3)


def find_alias_pairs(traced: TracedFunction) -> list[tuple[int, int]]:
    """(output, input) leaf pairs that are "the same state": same key path and aval.

    ``train_step(state, batch) -> (new_state, loss)``: ``new_state.params[...]`` pairs with
    ``state.params[...]``, so the plan gives them one sharding and the step can be called
    again on its own output without resharding. Paths are compared without the leading
    argument / output index.
    """
    candidates: dict[tuple, list[int]] = {}
    for i, (path, argnum, aval, is_batch) in enumerate(zip(
            traced.in_paths, traced.in_argnums, traced.in_avals, traced.batch_leaves)):
        if not is_batch:
            key = (path[len(f"arg{argnum}"):], aval.shape, aval.dtype)
            candidates.setdefault(key, []).append(i)
    out_leaves = jax.tree_util.tree_flatten_with_path(
        jax.tree_util.tree_unflatten(traced.out_tree, range(traced.out_tree.num_leaves)))[0]
    pairs = []
    for (path, j), aval in zip(out_leaves, traced.closed_jaxpr.out_avals):
        for suffix in (jax.tree_util.keystr(path[1:]), jax.tree_util.keystr(path)):
            hits = candidates.get((suffix, aval.shape, aval.dtype))
            if hits:
                pairs.append((j, hits.pop(0)))
                break
    return pairs


def micro_batch_args(args: Sequence, batch_mask: Sequence[bool], num_micro_batches: int,
                     static_argnums: Sequence[int], *, scale: int = 1) -> list:
    """Abstract args with each batch leaf's leading dim divided by the micro-batch count
    (and multiplied by ``scale``: a trace at another batch size)."""
    dynamic, static, dyn_idx = split_static_args(args, static_argnums)
    with_paths, tree = jax.tree_util.tree_flatten_with_path(tuple(dynamic))
    leaves = []
    for (path, leaf), is_batch in zip(with_paths, batch_mask):
        aval = abstractify(leaf)
        if is_batch:
            if aval.shape[0] % num_micro_batches:
                raise InvalidConfigError(
                    f"num_micro_batches={num_micro_batches} does not divide the batch dimension "
                    f"of argument {dyn_idx[path[0].idx]}{jax.tree_util.keystr(path[1:])} (size "
                    f"{aval.shape[0]}). Use a divisor of the batch size, or pad the batch.")
            aval = jax.ShapeDtypeStruct(
                (aval.shape[0] // num_micro_batches * scale,) + aval.shape[1:], aval.dtype,
                weak_type=aval.weak_type)
        leaves.append(aval)
    return rebuild_args(jax.tree_util.tree_unflatten(tree, leaves), static, dyn_idx)


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    traced: TracedFunction
    graph: OpGraph
    plan: ParallelPlan
    devices: tuple
    micro: MicroBatchPlan | None = None


def trace_step(fun: Callable, args: Sequence, step: StepSpec, num_micro_batches: int, *,
               analyse: bool = True, layer_option=None, record: dict | None = None,
               layer_starts: Sequence[int] | None = None,
               remat_layers: Sequence[bool] | None = None):
    """Traces the step at micro-batch size; returns (traced, graph, micro-batch plan).

    With more than one micro-batch (and ``analyse``), the step is traced at full batch size
    too (with the same layers, if ``layer_option`` constructs them), and
    `build_micro_batch_plan` decides how each value crossing the gradient boundary combines
    over micro-batches. ``remat_layers`` (one flag per layer) overrides the option's
    ``remat_layer`` (the stage DP's choice for ``remat_layer="auto"``).
    """
    mask = batch_leaf_mask(args, step)
    k = num_micro_batches
    record = {} if record is None else record
    transform = None if layer_option is None else build_layer_transform(
        layer_option, record, starts=None if layer_starts is None else list(layer_starts),
        remat_layers=remat_layers)
    trace_args = args if k == 1 else micro_batch_args(args, mask, k, step.static_argnums)
    with layer_construction(transform):
        traced = trace_function(fun, trace_args, static_argnums=step.static_argnums,
                                batch_leaves=mask)
    marked = has_grad_boundary(traced.closed_jaxpr.jaxpr)
    automatic_layers = None
    if layer_option is not None and not marked:  # differentiated by jax: layers built after
        automatic_layers = functools.partial(
            mark_layers, option=layer_option, starts=layer_starts, remat_layers=remat_layers,
            record=record)
    micro = full = None
    if (k > 1 and analyse) or not marked and (k > 1 or automatic_layers is not None):
        same_layers = None if layer_option is None else build_layer_transform(
            layer_option, starts=record.get("starts"), remat_layers=record.get("remat_layers"))
        # at another batch size: the full batch, or (one micro-batch) twice the batch
        other_args = args if k > 1 else micro_batch_args(args, mask, 1, step.static_argnums,
                                                         scale=2)
        with layer_construction(same_layers if marked else None):
            full = trace_function(fun, other_args, static_argnums=step.static_argnums,
                                  batch_leaves=mask)
        traced, full = mark_gradient_boundary(traced, full, layers=automatic_layers)
    graph = build_op_graph(traced.closed_jaxpr)
    if k > 1 and analyse:
        micro = build_micro_batch_plan(graph, build_op_graph(full.closed_jaxpr), k, list(mask))
    return traced, graph, micro


def plan_shard_parallel(fun: Callable, args: Sequence, method: ShardParallel, step: StepSpec,
                        devices: Sequence | None = None,
                        plan: ParallelPlan | None = None, cluster=None,
                        simulate: bool = False) -> CompiledPlan:
    """Traces and plans ``fun(*args)`` with a ShardParallel-family method.

    With ``cluster``, the mesh is priced with the cluster's links, compute and profile
    (executed on the local devices unless ``simulate``: then no devices are used). With
    ``plan`` given (a loaded plan), checks that it belongs to the traced function and uses it
    instead of solving.
    """
    start = time.perf_counter()
    if simulate:
        devices = []
        mesh = cluster.logical_mesh((cluster.num_hosts, cluster.devices_per_host),
                                    method.mesh_shape or (cluster.num_devices,))
    else:
        devices = resolve_devices(method, devices)
        mesh = build_logical_mesh(method, devices, cluster)
    k = method.micro_batches
    layer_option = method.layer_option

    def retrace(remat_layers=None):
        record: dict = {}
        traced, graph, micro = trace_step(fun, args, step, k, analyse=not simulate,
                                          layer_option=layer_option, record=record,
                                          remat_layers=remat_layers)
        return traced, graph, micro, record.get("remat_layers")

    traced, graph, micro, remat_flags = retrace(
        None if plan is None else plan.extra.get("remat_layers"))
    if plan is not None:
        check_plan_matches(plan, graph, mesh)
        return CompiledPlan(traced, graph, plan, tuple(devices), micro)
    opt_state, found = optimizer_state_mask(args, step)
    check_optimizer_state(method, found)
    auto_remat = layer_option is not None and layer_option.remat_layer == "auto"
    budget = method.memory_budget_per_device
    if auto_remat and budget is None:
        budget = default_memory_budget(cluster, devices)

    def solve(traced, graph):
        return solve_intra_op(
            graph, mesh, input_roles=input_roles(traced, opt_state),
            input_paths=list(traced.in_paths),
            policy=method.policy, alias_pairs=find_alias_pairs(traced),
            memory_budget_bytes=budget, strict=method.strict,
            donated_inputs=donated_leaves(traced, step.donate_argnums, len(args)),
            solver=method.solver, time_limit_s=method.solver_time_limit_s,
            share_repeated_layers=method.share_repeated_layers)

    try:
        sharding = solve(traced, graph)
    except InfeasiblePlanError:
        if not auto_remat:
            raise
        traced, graph, micro, remat_flags, sharding = _fewest_remat_layers(
            retrace, solve, sp.count_layers(graph))
    warn_plan_fallbacks(sharding)
    sync, update = pricing.estimate_once_per_step_s(graph, sharding)
    step_s = single_mesh_step_time_s(sharding.compute_s, sharding.objective, sync + update, k,
                                     getattr(mesh, "launch_latency_s", 0.0))
    extra = {"grad_sync_s": sync, "apply_s": update, "predicted_step_time_s": step_s}
    if remat_flags is not None:
        extra["remat_layers"] = [bool(f) for f in remat_flags]
    plan = ParallelPlan(method=type(method).__name__, num_micro_batches=k, sharding=sharding,
                        plan_time_s=time.perf_counter() - start, extra=extra)
    return CompiledPlan(traced, graph, plan, tuple(devices), micro)


def _fewest_remat_layers(retrace, solve, num_layers: int):
    """``remat_layer="auto"`` on one mesh: rematerializes the first ``r`` layers for the
    smallest ``r`` whose plan fits the memory budget (recomputing costs time, so fewer is
    faster). Binary search: if ``r`` layers fit, ``r + 1`` do. Returns the trace, the flags
    and the plan.

    Raises:
        InfeasiblePlanError: the plan does not fit even with every layer rematerialized.
    """
    def attempt(r):
        traced, graph, micro, flags = retrace([i < r for i in range(num_layers)])
        try:
            return traced, graph, micro, flags, solve(traced, graph)
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


def donated_leaves(traced: TracedFunction, donate_argnums, num_args: int) -> frozenset[int]:
    """Flat input positions of the donated arguments' leaves (their buffers are reused for
    the aliased outputs, so the memory model counts those once)."""
    donated = {i % num_args for i in donate_argnums}
    return frozenset(i for i, argnum in enumerate(traced.in_argnums) if argnum in donated)


def single_mesh_step_time_s(compute_s: float, comm_s: float, once_per_step_s: float, k: int,
                            launch_latency_s: float = 0.0) -> float:
    """One step of a single-mesh plan traced at micro-batch size: ``k`` micro-batches of
    compute and activation collectives, the once-per-step part (gradient sync and optimizer
    update, `pricing.estimate_once_per_step_s`) once, one program launch."""
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


def compile_plan(compiled, method, step: StepSpec, signature: tuple):
    """Emits the executable of a plan: one jitted SPMD program, or the pipeline runtime."""
    if isinstance(compiled, CompiledPipeline):
        return compile_pipeshard(compiled, method, signature)
    return ShardExecutable(compiled.traced, compiled.graph, compiled.plan, compiled.devices,
                           signature=signature, donate_argnums=step.donate_argnums,
                           micro=compiled.micro)


# --- PipeshardParallel -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SimulatedDevice:
    """Stands in for a device when planning for a `ClusterSpec` (never used to run)."""

    id: int
    platform: str = "gpu"


@dataclasses.dataclass(frozen=True)
class CompiledPipeline:
    traced: TracedFunction
    graph: OpGraph
    plan: ParallelPlan
    partition: object
    subgraphs: tuple
    index_maps: tuple
    stage_plans: tuple
    stage_devices: tuple
    assignment: object
    micro: MicroBatchPlan | None = None
    donated: frozenset[int] = frozenset()  # flat input positions whose buffers are reused


def plan_pipeshard(fun: Callable, args: Sequence, method, step: StepSpec,
                   cluster=None, plan: ParallelPlan | None = None,
                   simulate: bool = False) -> CompiledPipeline:
    """Traces ``fun`` with layer markers, builds stages (uniform / manual / DP), and plans
    every stage with the intra-op ILP on its own logical mesh.

    Layers and stages are priced by `inter_op.pricing` (the path simulation uses too), on
    the links of ``cluster`` when given, else of the method's link model. With ``simulate``,
    no devices are used (the cluster's device count). With ``plan`` (a loaded pipeline plan),
    its layers, stages and stage plans are used instead of solving, checked against this trace.
    """
    start = time.perf_counter()
    if simulate:
        devices = [_SimulatedDevice(i) for i in range(cluster.num_devices)]
        per_host = cluster.devices_per_host
    else:
        devices = list(method.devices) if method.devices is not None else list(jax.devices())
        per_host = min(method.devices_per_host or jax.local_device_count(), len(devices))
    k = method.num_micro_batches
    record: dict = {}
    loaded_layers = {} if plan is None else (plan.extra.get("layers") or {})
    starts = loaded_layers.get("starts")
    traced, graph, micro = trace_step(fun, args, step, k, analyse=not simulate,
                                      layer_option=method.layer_option, record=record,
                                      layer_starts=starts,
                                      remat_layers=loaded_layers.get("remat_layers"))
    num_layers = sp.count_layers(graph)
    if num_layers == 0:
        raise InvalidConfigError(
            "PipeshardParallel found no layers: compute gradients with alpa_lite.grad or "
            "alpa_lite.value_and_grad inside the step (they insert the layer markers).")
    mesh_of = stage_mesh_builder(method, cluster, devices[0].platform)
    budget = method.memory_budget_per_device or default_memory_budget(cluster, devices)
    roles = dict(zip(graph.inputs, input_roles(traced, optimizer_state_mask(args, step)[0])))
    donated = donated_leaves(traced, step.donate_argnums, len(args))
    position = {v: i for i, v in enumerate(graph.inputs)}
    params = frozenset(i for i, v in enumerate(graph.inputs) if roles[v] is InputRole.PARAM)
    state_ratio = pricing.estimate_state_bytes_per_param_byte(
        [roles[v] for v in graph.inputs], [graph.avals[v] for v in graph.inputs])
    if not params <= donated:  # the update writes new parameters and optimizer state beside
        state_ratio = 2 * state_ratio - 1  # the old ones (counted as if always held)
    options = pricing.PricingOptions(
        solver=method.solver, time_limit_s=method.solver_time_limit_s,
        state_bytes_per_param_byte=state_ratio, param_positions=params)
    link = stage_link(cluster, method, per_host, len(devices))
    # devices per host when a host's devices share compute (simulated CPU devices)
    shared = per_host if (cluster.shared_host_compute if cluster is not None
                          else devices[0].platform == "cpu") else None
    option = method.stage_option
    priced = None  # layer prices per (submesh, view), when the stage DP made them
    stage_prices = defaultdict(float)  # per stage, seconds per byte of state (lean stages)
    if plan is not None:
        assignment = loaded_assignment(plan, num_layers)
    elif isinstance(option, UniformStageOption):
        assignment = sp.assign_uniform(option, num_layers, len(devices), per_host)
    elif isinstance(option, ManualStageOption):
        assignment = sp.assign_manual(option, num_layers, len(devices))
    else:
        candidates = [(tuple(shape), view) for shape in (
            option.submesh_shapes or enumerate_submesh_shapes(max(len(devices) // per_host, 1),
                                                              per_host))
            if sp.submesh_devices(shape) <= len(devices) for view in sp.logical_views(shape)]
        graphs = {False: graph}
        if method.layer_option.remat_layer == "auto" and not record.get("automatic"):  # price remat
            graphs[True] = trace_step(
                fun, args, step, k, analyse=False, layer_starts=record["starts"],
                layer_option=dataclasses.replace(method.layer_option, remat_layer=True))[1]
        tables = {(remat, 0.0): pricing.price_layers(g, num_layers, candidates, mesh_of,
                                                     options) for remat, g in graphs.items()}
        solve = functools.partial(
            pricing.solve_stages, tables[(False, 0.0)], {c: mesh_of(*c) for c in candidates},
            num_devices=len(devices), k=k, schedule=method.schedule,
            memory_budget_bytes=budget, link=link, max_num_stages=option.max_num_stages,
            shared_compute_per_host=shared, remat_priced=tables.get((True, 0.0)))
        try:
            assignment, _, _, dp_memory = solve()
            binds = pricing.memory_binds(True, assignment.predicted_latency_s, solve(
                memory_budget_bytes=None)[0].predicted_latency_s)
        except InfeasiblePlanError:
            binds = True
        if binds:  # the budget costs time: offer the layers' memory-lean plans too
            lean = {(remat, level): t for remat, g in graphs.items()
                    for level, t in pricing.price_lean_layers(
                        g, num_layers, candidates, mesh_of, options,
                        tables[(remat, 0.0)]).items()}
            tables.update(lean)
            assignment, _, _, dp_memory = solve(lean_priced=lean)
        # each layer's prices: those its stage was chosen with
        variant = [(bool(assignment.remat and assignment.remat[s]),
                    float(assignment.lean[s]) if assignment.lean else 0.0)
                   for s in assignment.layer_to_stage]
        priced = {c: [tables[variant[l]][c][l] for l in range(num_layers)]
                  for c in tables[(False, 0.0)]}
        for s, level in enumerate(assignment.lean or ()):  # the stage ILP prices it alike
            chosen = (assignment.submesh_shapes[s], assignment.logical_shapes[s])
            stage_prices[s] = pricing.memory_price(level, [
                tables[(variant[l][0], 0.0)][chosen][l] for l in assignment.stage_layers(s)])
        if len(graphs) > 1:
            flags = [remat for remat, _ in variant]
            if any(flags):  # trace again with the chosen layers rematerialized
                traced, graph, micro = trace_step(
                    fun, args, step, k, analyse=not simulate, layer_option=method.layer_option,
                    record=record, layer_starts=record["starts"], remat_layers=flags)
    if assignment.remat is None:  # as traced: a stage rematerializes if its layers do
        flags = record.get("remat_layers") or [False] * num_layers
        assignment = dataclasses.replace(assignment, remat=tuple(
            any(flags[l] for l in assignment.stage_layers(s))
            for s in range(assignment.num_stages)))
    if assignment.num_stages == 1 and not simulate:
        compiled = _plan_one_stage(fun, args, method, step, assignment, devices, start, plan)
        if plan is None and isinstance(option, AutoStageOption):
            compiled.plan.extra["stage_memory_bytes"] = list(dp_memory)
        return compiled
    stage_options = [(tuple(assignment.submesh_shapes[s]), tuple(assignment.logical_shapes[s]))
                     for s in range(assignment.num_stages)]
    batch_inputs = [v for v, b in zip(graph.inputs, traced.batch_leaves) if b]
    partition = partition_pipeline(graph, batch_inputs, list(assignment.layer_to_stage),
                                   assignment.num_stages,
                                   micro.random_dims if micro is not None else ())
    aliases = find_alias_pairs(traced)
    subgraphs, index_maps, plans = [], [], []
    stage_devices = sp.place_stages(assignment.submesh_shapes, devices, per_host)
    boundary_index = partition.boundary.index
    for s in range(assignment.num_stages):
        nodes = partition.mesh_nodes[s]
        items = ([i for i in nodes if i < boundary_index]
                 + [boundary_slice(partition.boundary, partition.sinks, s, -1)]
                 + [i for i in nodes if i > boundary_index])
        sub, index_map = build_subgraph(graph, items)
        mesh = mesh_of(*stage_options[s])
        if plan is not None:
            plans.append(loaded_stage_plan(plan, s, sub, mesh))
        else:
            plans.append(solve_intra_op(
                sub, mesh, input_roles=[roles.get(v, InputRole.PARAM) for v in sub.inputs],
                input_paths=[_value_name(traced, graph, v) for v in sub.inputs],
                alias_pairs=_sub_alias_pairs(graph, sub, aliases), strict=method.strict,
                solver=method.solver, time_limit_s=method.solver_time_limit_s,
                memory_budget_bytes=budget, donated_inputs=frozenset(
                    i for i, v in enumerate(sub.inputs) if position.get(v) in donated),
                input_memory_price=[
                    stage_prices[s] * _STATE_BYTES_PER_INPUT_BYTE.get(roles.get(v), 0.0)
                    for v in sub.inputs]))
        subgraphs.append(sub)
        index_maps.append(index_map)
    if plan is not None:  # the loaded plan's predictions: nothing is solved again
        stages, latency = tuple(plan.stages), plan.predicted_step_time_s
    else:
        if priced is None:  # uniform / manual stages: price the chosen (submesh, view)s only
            priced = pricing.price_layers(graph, num_layers, sorted(set(stage_options)),
                                          mesh_of, options)
        stages, latency = build_stage_records(
            assignment, priced, stage_options, plans, partition, graph, k, method.schedule,
            mesh_of, link, pricing.shared_stage_hosts(assignment.submesh_shapes, shared))
    plan = ParallelPlan(method="PipeshardParallel", num_micro_batches=k, sharding=None,
                        plan_time_s=time.perf_counter() - start, stages=stages,
                        extra={"objective": latency, "predicted_step_time_s": latency,
                               "schedule": method.schedule, "layers": record,
                               "num_layers": num_layers, "memory_budget_bytes": budget})
    return CompiledPipeline(traced, graph, plan, partition, tuple(subgraphs), tuple(index_maps),
                            tuple(plans), tuple(stage_devices), assignment, micro, donated)


def stage_mesh_builder(method, cluster, platform: str):
    """``(submesh, view) -> LogicalMesh``: the cluster's links and compute when a cluster is
    given, else the method's link model and per-platform defaults."""
    if cluster is not None:
        return lambda shape, view: cluster.logical_mesh(tuple(shape), tuple(view))
    peak = _DEFAULT_PEAK_FLOPS.get(platform, 1e12)
    return lambda shape, view: sp.link_model(method, tuple(view), tuple(shape), platform, peak,
                                             None)


def stage_link(cluster, method, per_host: int, num_devices: int) -> tuple[float, float]:
    """(alpha, seconds per byte) of a stage-to-stage transfer: the inter-host link when the
    devices span hosts (stages then usually sit on different hosts), else the intra-host."""
    across = num_devices > per_host
    if cluster is not None:
        spec = cluster.inter_host if across else cluster.intra_host
        return spec.alpha_s, spec.beta_s_per_byte
    mesh = sp.link_model(method, (2,), (2, 1) if across else (1, 2), "cpu", 1.0, None)
    return mesh.alpha_s[0], mesh.beta_s_per_byte[0]


def default_memory_budget(cluster, devices) -> float | None:
    """The memory of one device: the cluster's, else what the live devices report."""
    if cluster is not None:
        return float(cluster.memory_per_device_bytes)
    if not devices or isinstance(devices[0], _SimulatedDevice):
        return None
    try:
        return float(ClusterSpec.from_devices(devices).memory_per_device_bytes)
    except InvalidConfigError:  # uneven hosts: no single number
        return None


def build_stage_records(assignment, priced, stage_options, plans, partition, graph, k: int,
                        schedule: str, mesh_of, link, stage_hosts=None
                        ) -> tuple[tuple[StagePlan, ...], float]:
    """Per stage: layers, meshes, predicted forward/backward/gradient-sync/update seconds and
    memory from the layer prices (the DP's numbers); and the pipeline's predicted step time
    (`pricing.pipeline_step_time_s`; ``stage_hosts`` when hosts share compute)."""
    num_stages = assignment.num_stages
    times, once, records = [], [], []
    for s in range(num_stages):
        layers = assignment.stage_layers(s)
        span = [priced[stage_options[s]][l] for l in layers]
        t, g, u = pricing.estimate_stage(span, mesh_of(*stage_options[s]), link[1], link[0],
                                         s == num_stages - 1)
        times.append(t)
        once.append(g + u)
        share = _forward_share(partition, graph, s)
        in_flight = in_flight_micro_batches(schedule, num_stages, s, k)
        records.append(StagePlan(
            stage=s, layers=tuple(layers), remat=_stage_remat(assignment, layers),
            lean=float(assignment.lean[s]) if assignment.lean else 0.0,
            submesh=tuple(assignment.submesh_shapes[s]),
            logical_mesh=tuple(plans[s].mesh.shape), forward_s=t * share,
            backward_s=t * (1 - share), grad_sync_s=g, apply_s=u,
            peak_memory_bytes=sum(p.state_bytes for p in span)
            + in_flight * sum(p.activation_bytes for p in span), plan=plans[s],
            num_operators=len(partition.forward[s].nodes) + len(partition.backward[s].nodes)))
    return tuple(records), pricing.pipeline_step_time_s(times, once, k,
                                                        stage_hosts=stage_hosts)


def _stage_remat(assignment, layers) -> bool:
    """Whether a stage's layers are rematerialized (the DP's choice, else the option's)."""
    return bool(assignment.remat[assignment.layer_to_stage[layers[0]]])


def _forward_share(partition, graph: OpGraph, stage: int) -> float:
    """The forward program's share of the stage's flops (splits its time into forward and
    backward for the timeline)."""
    def flops(program) -> float:
        return sum(estimate_op_cost(graph.nodes[i].primitive, graph.nodes[i].params,
                                    [graph.avals[v] if isinstance(v, int) else v.aval
                                     for v in graph.nodes[i].invars],
                                    [graph.avals[v] for v in graph.nodes[i].outvars]).flops
                   for i in program.nodes)

    forward, backward = flops(partition.forward[stage]), flops(partition.backward[stage])
    return forward / (forward + backward) if forward + backward > 0 else 0.5


def _plan_one_stage(fun, args, method, step, assignment, devices, start,
                    loaded: ParallelPlan | None = None) -> CompiledPlan:
    """A pipeline of one stage is intra-op parallelism on that stage's mesh: plan and run it
    as `ShardParallel` (one jitted program instead of the pipeline runtime)."""
    num = sp.submesh_devices(assignment.submesh_shapes[0])
    shard = ShardParallel(mesh_shape=assignment.logical_shapes[0], devices=tuple(devices[:num]),
                          num_micro_batches=method.num_micro_batches, strict=method.strict,
                          solver=method.solver, solver_time_limit_s=method.solver_time_limit_s,
                          memory_budget_per_device=method.memory_budget_per_device,
                          layer_option=_remat_layer_option(method.layer_option, assignment))
    compiled = plan_shard_parallel(fun, args, shard, step, plan=loaded)
    if loaded is not None:
        return compiled
    plan = dataclasses.replace(
        compiled.plan, method="PipeshardParallel", plan_time_s=time.perf_counter() - start,
        extra={"one_stage": "a single stage runs as ShardParallel on its mesh",
               "logical_mesh": list(assignment.logical_shapes[0]),
               "submesh": list(assignment.submesh_shapes[0]),
               "remat": shard.layer_option is not None,
               "lean": float(assignment.lean[0]) if assignment.lean else 0.0})
    return dataclasses.replace(compiled, plan=plan)


def _remat_layer_option(option, assignment):
    """The layer option a one-stage pipeline keeps for its ShardParallel run: the option
    (with ``remat_layer=True``) when its stage rematerializes, else None (no markers)."""
    return dataclasses.replace(option, remat_layer=True) if assignment.remat[0] else None


def loaded_assignment(plan: ParallelPlan, num_layers: int):
    """The `StageAssignment` a loaded pipeline plan was made with (checked against the
    number of layers of this trace)."""
    if plan.method != "PipeshardParallel":
        raise InvalidConfigError(
            f"The loaded plan is a {plan.method} plan; PipeshardParallel needs a pipeline plan "
            "(made by a PipeshardParallel method). Use the plan with its own method.")
    if plan.sharding is not None:  # one stage, run as ShardParallel
        logical = tuple(plan.extra["logical_mesh"])
        submesh = tuple(plan.extra.get("submesh") or (1, math.prod(logical)))
        return sp.StageAssignment((0,) * num_layers, (submesh,), (logical,),
                                  remat=(bool(plan.extra.get("remat", False)),))
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


def loaded_stage_plan(plan: ParallelPlan, stage: int, sub: OpGraph, mesh: LogicalMesh):
    """Stage ``stage``'s `ShardingPlan` from a loaded pipeline plan, checked against the
    stage's sub-graph."""
    loaded = plan.stages[stage].plan
    check_plan_matches(ParallelPlan("stage", 1, loaded, 0.0), sub, mesh)
    return loaded


def compile_pipeshard(compiled: CompiledPipeline, method, signature: tuple):
    meshes = [build_jax_mesh(plan.mesh, devices)
              for plan, devices in zip(compiled.stage_plans, compiled.stage_devices)]
    schedule = build_schedule(method.schedule, len(meshes), method.num_micro_batches)
    return PipelineExecutable(compiled.traced, compiled.graph, compiled.partition,
                              compiled.subgraphs, compiled.index_maps, compiled.stage_plans,
                              meshes, schedule, method.num_micro_batches, compiled.micro,
                              signature, compiled.donated,
                              frozenset(j for j, _ in find_alias_pairs(compiled.traced)))


def _sub_alias_pairs(graph: OpGraph, sub: OpGraph, aliases) -> list[tuple[int, int]]:
    out_pos = {v: i for i, v in enumerate(sub.outputs)}
    in_pos = {v: i for i, v in enumerate(sub.inputs)}
    pairs = []
    for out_j, in_i in aliases:
        out_v, in_v = graph.outputs[out_j], graph.inputs[in_i]
        if isinstance(out_v, int) and out_v in out_pos and in_v in in_pos:
            pairs.append((out_pos[out_v], in_pos[in_v]))
    return pairs


def _value_name(traced: TracedFunction, graph: OpGraph, v: int) -> str:
    if v in graph.inputs:
        return traced.in_paths[graph.inputs.index(v)]
    return f"value{v}"
