"""Step analysis and tracing: what a train step's arguments are (batch, parameters,
optimizer state, donated, aliased with outputs) and its trace at micro-batch size
(`trace_step`), with layers and the micro-batch analysis when asked.

Every planner starts here: `intra_op.driver` (one mesh) and `inter_op.driver` (pipelines).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np

from alpa_lite.auto_layers import mark_layers
from alpa_lite.errors import InvalidConfigError
from alpa_lite.gradient_boundary import has_grad_boundary, mark_gradient_boundary
from alpa_lite.graph import OpGraph, build_op_graph
from alpa_lite.intra_op.problem import InputRole, SpecPolicy
from alpa_lite.layers import LayerRecord, build_layer_transform
from alpa_lite.markers import layer_construction
from alpa_lite.micro_batching import MicroBatchPlan, build_micro_batch_plan
from alpa_lite.trace import (TracedFunction, abstractify, rebuild_args, split_static_args,
                             trace_function)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """How a step function is called: which positional args are static, donated, batch."""

    static_argnums: tuple[int, ...] = ()
    donate_argnums: tuple[int, ...] = ()
    batch_argnums: tuple[int, ...] = (1,)


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


def donated_leaves(traced: TracedFunction, donate_argnums, num_args: int) -> frozenset[int]:
    """Flat input positions of the donated arguments' leaves (their buffers are reused for
    the aliased outputs, so the memory model counts those once)."""
    donated = {i % num_args for i in donate_argnums}
    return frozenset(i for i, argnum in enumerate(traced.in_argnums) if argnum in donated)


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
class StepTrace:
    """A step traced at micro-batch size (`trace_step`).

    Attributes:
        traced: the trace (closed jaxpr over the flat dynamic arguments).
        graph: its operator graph.
        micro: how values crossing the gradient boundary combine over micro-batches (None
            with one micro-batch, or when not analysed).
        layers: the pipeline layers marked (None without a layer option).
    """

    traced: TracedFunction
    graph: OpGraph
    micro: MicroBatchPlan | None = None
    layers: LayerRecord | None = None


def trace_step(fun: Callable, args: Sequence, step: StepSpec, num_micro_batches: int, *,
               analyse: bool = True, layer_option=None,
               layer_starts: Sequence[int] | None = None,
               remat_layers: Sequence[bool] | None = None) -> StepTrace:
    """Traces the step at micro-batch size.

    With more than one micro-batch (and ``analyse``), the step is traced at full batch size
    too (with the same layers, if ``layer_option`` constructs them), and
    `build_micro_batch_plan` decides how each value crossing the gradient boundary combines
    over micro-batches. A step differentiated by jax (no `alpa_lite.grad`) is traced at a
    second batch size to find its gradient boundary, and gets its layers there. Given
    ``layer_starts`` (a saved `LayerRecord`'s), layers start there; ``remat_layers`` (one flag
    per layer) overrides the option's ``remat_layer``.
    """
    mask = batch_leaf_mask(args, step)
    k = num_micro_batches
    transform = None if layer_option is None else build_layer_transform(
        layer_option, layer_starts, remat_layers)
    trace_args = args if k == 1 else micro_batch_args(args, mask, k, step.static_argnums)
    with layer_construction(transform):
        traced = trace_function(fun, trace_args, static_argnums=step.static_argnums,
                                batch_leaves=mask)
    record = None if transform is None else transform.record
    marked = has_grad_boundary(traced.closed_jaxpr.jaxpr)
    automatic = None
    if layer_option is not None and not marked:  # differentiated by jax: layers built after
        automatic = functools.partial(mark_layers, option=layer_option, starts=layer_starts,
                                      remat_layers=remat_layers)
    full = None
    if (k > 1 and analyse) or not marked and (k > 1 or automatic is not None):
        same_layers = None if record is None else build_layer_transform(
            layer_option, record.starts, record.remat_layers)
        # at another batch size: the full batch, or (one micro-batch) twice the batch
        other_args = args if k > 1 else micro_batch_args(args, mask, 1, step.static_argnums,
                                                         scale=2)
        with layer_construction(same_layers if marked else None):
            full = trace_function(fun, other_args, static_argnums=step.static_argnums,
                                  batch_leaves=mask)
        traced, full, found = mark_gradient_boundary(traced, full, layers=automatic)
        record = found or record
    graph = build_op_graph(traced.closed_jaxpr)
    micro = None
    if k > 1 and analyse:
        micro = build_micro_batch_plan(graph, build_op_graph(full.closed_jaxpr), k, list(mask))
    return StepTrace(traced, graph, micro, record)


def sub_alias_pairs(graph: OpGraph, sub: OpGraph, aliases) -> list[tuple[int, int]]:
    """``aliases`` (`find_alias_pairs` of ``graph``) as positions of a sub-graph's outputs
    and inputs, where both ends are in it."""
    out_pos = {v: i for i, v in enumerate(sub.outputs)}
    in_pos = {v: i for i, v in enumerate(sub.inputs)}
    pairs = []
    for out_j, in_i in aliases:
        out_v, in_v = graph.outputs[out_j], graph.inputs[in_i]
        if isinstance(out_v, int) and out_v in out_pos and in_v in in_pos:
            pairs.append((out_pos[out_v], in_pos[in_v]))
    return pairs


def value_name(traced: TracedFunction, graph: OpGraph, v: int) -> str:
    """A value's name for messages: an input's key path, else ``value<id>``."""
    if v in graph.inputs:
        return traced.in_paths[graph.inputs.index(v)]
    return f"value{v}"
