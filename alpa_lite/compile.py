"""The end-to-end pipeline, top to bottom: trace -> graph -> cost -> intra-op ILP -> emit.

Each step is a call into the module that owns it; this file only wires them together.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax

from alpa_lite.config import ShardParallel
from alpa_lite.emit.executable import ShardExecutable
from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import OpGraph, build_op_graph
from alpa_lite.intra_op.planner import graph_fingerprint, solve_intra_op
from alpa_lite.intra_op.problem import InputRole
from alpa_lite.mesh import LogicalMesh
from alpa_lite.plan import ParallelPlan
from alpa_lite.trace import TracedFunction, abstractify, split_static_args, trace_function

# Rough defaults when the user gives no link model: they only scale predicted times; the
# ILP's choices depend on ratios between axes, which are equal here.
_DEFAULT_ALPHA_S = 5e-6
_DEFAULT_BETA_S_PER_BYTE = {"cpu": 1 / 10e9, "gpu": 1 / 100e9, "tpu": 1 / 100e9}
_DEFAULT_PEAK_FLOPS = {"cpu": 5e10, "gpu": 4e14, "tpu": 2e14}


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
              else int(__import__("math").prod(method.mesh_shape)))
    if wanted > len(devices):
        raise InvalidConfigError(
            f"mesh_shape {method.mesh_shape} needs {wanted} devices but only {len(devices)} are "
            "available. Use a smaller mesh, or on CPU simulate more devices with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N (set before importing jax).")
    return devices[:wanted]


def build_logical_mesh(method: ShardParallel, devices: Sequence) -> LogicalMesh:
    shape = method.mesh_shape or (len(devices),)
    platform = devices[0].platform if devices else "cpu"
    alpha = method.mesh_alpha or (_DEFAULT_ALPHA_S,) * len(shape)
    beta = method.mesh_beta or (_DEFAULT_BETA_S_PER_BYTE.get(platform, 1e-10),) * len(shape)
    return LogicalMesh(shape=shape, alpha_s=alpha, beta_s_per_byte=beta,
                       memory_per_device_bytes=method.memory_budget_per_device,
                       peak_flops_per_s=_DEFAULT_PEAK_FLOPS.get(platform, 1e12))


def input_roles(traced: TracedFunction) -> list[InputRole]:
    """Batch leaves, optimizer state (key path contains ``opt_state``) and parameters."""
    roles = []
    for path, is_batch in zip(traced.in_paths, traced.batch_leaves):
        if is_batch:
            roles.append(InputRole.BATCH)
        elif "opt_state" in path:
            roles.append(InputRole.OPT_STATE)
        else:
            roles.append(InputRole.PARAM)
    return roles


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


def micro_batch_args(args: Sequence, batch_argnums: Sequence[int], num_micro_batches: int,
                     static_argnums: Sequence[int]) -> list:
    """Abstract args with each batch leaf's leading dim divided by the micro-batch count."""
    result = [abstractify_tree(a) if i not in static_argnums else a for i, a in enumerate(args)]
    for i in batch_argnums:
        def shrink(path, leaf):
            if not leaf.shape or leaf.shape[0] % num_micro_batches:
                raise InvalidConfigError(
                    f"num_micro_batches={num_micro_batches} does not divide the batch dimension "
                    f"of argument {i}{jax.tree_util.keystr(path)} (size "
                    f"{leaf.shape[0] if leaf.shape else 'scalar'}). Use a divisor of the batch "
                    "size, or pad the batch.")
            return jax.ShapeDtypeStruct((leaf.shape[0] // num_micro_batches,) + leaf.shape[1:],
                                        leaf.dtype)
        result[i] = jax.tree_util.tree_map_with_path(shrink, result[i])
    return result


def abstractify_tree(tree):
    return jax.tree_util.tree_map(abstractify, tree)


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    traced: TracedFunction
    graph: OpGraph
    plan: ParallelPlan
    devices: tuple


def plan_shard_parallel(fun: Callable, args: Sequence, method: ShardParallel, step: StepSpec,
                        devices: Sequence | None = None,
                        plan: ParallelPlan | None = None) -> CompiledPlan:
    """Traces and plans ``fun(*args)`` with a ShardParallel-family method.

    With ``plan`` given (a loaded plan), checks that it belongs to the traced function and
    uses it instead of solving.
    """
    start = time.perf_counter()
    devices = resolve_devices(method, devices)
    mesh = build_logical_mesh(method, devices)
    k = method.micro_batches
    trace_args = args if k == 1 else micro_batch_args(args, step.batch_argnums, k,
                                                      step.static_argnums)
    traced = trace_function(fun, trace_args, static_argnums=step.static_argnums,
                            batch_argnums=step.batch_argnums)
    graph = build_op_graph(traced.closed_jaxpr)
    if plan is not None:
        check_plan_matches(plan, graph, mesh)
        return CompiledPlan(traced, graph, plan, tuple(devices))
    sharding = solve_intra_op(
        graph, mesh, input_roles=input_roles(traced), input_paths=list(traced.in_paths),
        policy=method.policy, alias_pairs=find_alias_pairs(traced),
        memory_budget_bytes=method.memory_budget_per_device, strict=method.strict,
        solver=method.solver, time_limit_s=method.solver_time_limit_s,
        share_repeated_layers=method.share_repeated_layers)
    plan = ParallelPlan(method=type(method).__name__, num_micro_batches=k, sharding=sharding,
                        plan_time_s=time.perf_counter() - start)
    return CompiledPlan(traced, graph, plan, tuple(devices))


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


def compile_shard_parallel(compiled: CompiledPlan, step: StepSpec) -> ShardExecutable:
    """Emits the jitted SPMD program for a ShardParallel-family plan."""
    return ShardExecutable(compiled.traced, compiled.graph, compiled.plan, compiled.devices,
                           donate_argnums=step.donate_argnums)
