"""Per-primitive sharding rules: most are one `FactorRule`, a few are written by hand.

A rule takes a `StrategyContext` and returns a `FactorRule` (enumerated generically), a list
of `Strategy`s, or None for "no rule" (the node then gets the visible replicated fallback).
Dims that a primitive touches in a way a plain split cannot express (sliced, padded,
windowed, gathered-from) get factor None: they stay whole on every device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from jax.extend.core import primitives as prims

from alpa_lite._jax_compat import (key_wrapping_primitives, split_primitive, stack_primitives,
                                   tile_primitive)
from alpa_lite.cost.registry import OpClass, is_elementwise, primitives_of
from alpa_lite.cost.registry import itemsize as dtype_itemsize
from alpa_lite.errors import UnsupportedPrimitiveError
from alpa_lite.loop_regions import loop_enter_p, loop_exit_p
from alpa_lite.intra_op.strategies import (FactorRule, Strategy, enumerate_factor_strategies,
                                           replicated_strategy)
from alpa_lite.mesh import LogicalMesh


@dataclasses.dataclass(frozen=True, kw_only=True)
class StrategyContext:
    """What a strategy rule may look at."""

    primitive: object
    params: dict
    avals_in: tuple
    avals_out: tuple


StrategyRule = Callable[[StrategyContext], "FactorRule | list[Strategy] | None"]
_STRATEGY_RULES: dict[object, StrategyRule] = {}
# (predicate, rule): the rule of every primitive without one of its own that the predicate
# accepts (elementwise primitives a newer jax adds).
_DERIVED_RULES: list[tuple[Callable[[object], bool], StrategyRule]] = []

# Primitives that are replicated on purpose (not a missing rule): control flow and RNG state.
REPLICATED_BY_DESIGN = {
    getattr(prims, name) for name in (
        "scan_p", "while_p", "cond_p", "random_bits_p", "random_seed_p", "random_split_p",
        "random_fold_in_p", "random_wrap_p", "random_unwrap_p", "rng_bit_generator_p",
        "rng_uniform_p",
    ) if hasattr(prims, name)
}


def is_replicated_by_design(primitive) -> bool:
    """Control flow and random-number primitives: replicated on purpose, not a fallback."""
    return primitive in REPLICATED_BY_DESIGN or primitive in key_wrapping_primitives()


def register_strategy_rule(*primitives, derived: Callable[[object], bool] | None = None
                           ) -> Callable[[StrategyRule], StrategyRule]:
    """Decorator registering a strategy rule for ``primitives`` (objects, not names) and,
    with ``derived``, for every other primitive that ``derived(primitive)`` accepts."""

    def register(rule: StrategyRule) -> StrategyRule:
        if derived is not None:
            _DERIVED_RULES.append((derived, rule))
        for primitive in primitives:
            if primitive in _STRATEGY_RULES:
                raise ValueError(f"A strategy rule for {primitive.name!r} is already registered.")
            _STRATEGY_RULES[primitive] = rule
        return rule

    return register


def _rule_for(primitive) -> StrategyRule | None:
    rule = _STRATEGY_RULES.get(primitive)
    if rule is None and not is_replicated_by_design(primitive):
        rule = next((r for accepts, r in _DERIVED_RULES if accepts(primitive)), None)
    return rule


def has_strategy_rule(primitive) -> bool:
    return _rule_for(primitive) is not None or is_replicated_by_design(primitive)


def build_node_rule(ctx: StrategyContext) -> "FactorRule | list[Strategy] | None":
    """The registered rule's answer for one operator (None: no rule, or it declined)."""
    rule = _rule_for(ctx.primitive)
    return rule(ctx) if rule is not None else None


def enumerate_node_strategies(ctx: StrategyContext, rule, mesh: LogicalMesh, *, strict: bool,
                              allow_mixed_mesh_shape: bool = True) -> tuple[list[Strategy], bool]:
    """Strategies of one operator (all of them, before any filtering), and a fallback flag.

    Raises:
        UnsupportedPrimitiveError: in strict mode, for a primitive without a rule.
    """
    result = rule
    if isinstance(rule, FactorRule):
        itemsize = dtype_itemsize(ctx.avals_out[0].dtype) if ctx.avals_out else 4
        result = enumerate_factor_strategies(rule, mesh, itemsize,
                                             allow_mixed_mesh_shape=allow_mixed_mesh_shape)
    if result:
        return list(result), False
    by_design = is_replicated_by_design(ctx.primitive)
    if not by_design and strict:
        raise UnsupportedPrimitiveError(
            f"No sharding rule for primitive {ctx.primitive.name!r} and strict mode is on. "
            "Register one with alpa_lite.intra_op.strategy_rules.register_strategy_rule, or "
            "pass strict=False to accept the replicated fallback (listed in plan.summary())."
        )
    return [replicated_for(ctx, fallback=not by_design)], not by_design


def replicated_for(ctx: StrategyContext, *, fallback: bool) -> Strategy:
    ranks_in = [getattr(a, "ndim", None) for a in ctx.avals_in]
    ranks_out = [getattr(a, "ndim", 0) for a in ctx.avals_out]
    return replicated_strategy(ranks_in, ranks_out, fallback=fallback)


# --- helpers ---------------------------------------------------------------------------------


def _dims(prefix: str, shape) -> tuple[list[str], dict[str, int]]:
    names = [f"{prefix}{i}" for i in range(len(shape))]
    return names, dict(zip(names, shape))


def _untouched_dims_rule(ctx: StrategyContext, touched: set[int], **kw) -> FactorRule:
    """All operands and results share one shape; dims in ``touched`` stay whole."""
    shape = ctx.avals_out[0].shape
    names, sizes = _dims("d", shape)
    dims = tuple(None if i in touched else f for i, f in enumerate(names))
    operands = tuple(dims if a.shape == shape else ((None,) * a.ndim) for a in ctx.avals_in)
    return FactorRule(operands, tuple(dims for _ in ctx.avals_out),
                      tuple(sorted(sizes.items())), **kw)


# --- the border of a scan body ----------------------------------------------------------------


@register_strategy_rule(loop_enter_p, loop_exit_p)
def _loop_border_strategies(ctx: StrategyContext):
    """Carries keep their spec; a stacked operand's slice takes its spec minus the layer dim.

    The leading (stacked, iteration) dim of ``xs``/``ys`` is never split: each iteration
    reads or writes one whole slice on every device.
    """
    kind = ctx.params["kind"]
    if kind == "join":  # a cond's result: (index, result of each branch) -> result
        names, sizes = _dims("d", ctx.avals_out[0].shape)
        dims = tuple(names)
        return FactorRule(((),) + (dims,) * (len(ctx.avals_in) - 1), (dims,),
                          tuple(sorted(sizes.items())))
    big = ctx.avals_in[0] if kind == "slice" else ctx.avals_out[0]
    names, sizes = _dims("d", big.shape)
    if kind in ("carry", "invariant"):
        return FactorRule((tuple(names),), (tuple(names),), tuple(sorted(sizes.items())))
    stacked, one = (None, *names[1:]), tuple(names[1:])
    sizes.pop(names[0])
    if kind == "slice":
        return FactorRule((stacked,), (one,), tuple(sorted(sizes.items())))
    return FactorRule((one,), (stacked,), tuple(sorted(sizes.items())))


# --- elementwise and data movement -----------------------------------------------------------


@register_strategy_rule(*primitives_of(OpClass.ELEMENTWISE), prims.sharding_constraint_p,
                        derived=is_elementwise)
def _elementwise_strategies(ctx: StrategyContext):
    shape = ctx.avals_out[0].shape
    if any(a.shape != shape for a in ctx.avals_out):
        return None
    names, sizes = _dims("d", shape)
    operands = []
    for aval in ctx.avals_in:
        if aval.ndim == 0:
            operands.append(())
        elif aval.ndim == len(shape):  # lax broadcasts size-1 dims implicitly
            operands.append(tuple(f if aval.shape[d] == shape[d] else None
                                  for d, f in enumerate(names)))
        else:
            return None
    results = tuple(tuple(names) for _ in ctx.avals_out)
    return FactorRule(tuple(operands), results, tuple(sorted(sizes.items())))


@register_strategy_rule(prims.iota_p, prims.empty2_p)  # empty2: uninitialised (cond transposes)
def _iota_strategies(ctx: StrategyContext):
    names, sizes = _dims("d", ctx.avals_out[0].shape)
    return FactorRule((), (tuple(names),), tuple(sorted(sizes.items())))


@register_strategy_rule(prims.broadcast_in_dim_p)
def _broadcast_strategies(ctx: StrategyContext):
    if len(ctx.avals_in) != 1:
        return None
    operand, out = ctx.avals_in[0], ctx.avals_out[0]
    names, sizes = _dims("d", out.shape)
    bdims = ctx.params["broadcast_dimensions"]
    op_dims = tuple(names[j] if operand.shape[i] == out.shape[j] else None
                    for i, j in enumerate(bdims))
    return FactorRule((op_dims,), (tuple(names),), tuple(sorted(sizes.items())))


@register_strategy_rule(prims.transpose_p)
def _transpose_strategies(ctx: StrategyContext):
    operand = ctx.avals_in[0]
    names, sizes = _dims("d", operand.shape)
    perm = ctx.params["permutation"]
    return FactorRule((tuple(names),), (tuple(names[p] for p in perm),),
                      tuple(sorted(sizes.items())))


@register_strategy_rule(prims.reshape_p, prims.squeeze_p)
def _reshape_strategies(ctx: StrategyContext):
    if len(ctx.avals_in) != 1:
        return None
    in_shape, out_shape = ctx.avals_in[0].shape, ctx.avals_out[0].shape
    in_f, out_f, sizes = build_reshape_factors(in_shape, out_shape)
    return FactorRule((in_f,), (out_f,), tuple(sorted(sizes.items())))


def build_reshape_factors(in_shape, out_shape):
    """Matches groups of input and output dims with equal products.

    Within a group only the leading (most major) dims can share a split, and only by a
    divisor of both sizes: ``[B, S, H] -> [B*S, H]`` keeps a split of ``B``.

    Example:
        >>> build_reshape_factors((4, 6, 8), (24, 8))
        (('g0', None, 'g1'), ('g0', 'g1'), {'g0': 4, 'g1': 8})
    """
    in_f: list[str | None] = [None] * len(in_shape)
    out_f: list[str | None] = [None] * len(out_shape)
    sizes: dict[str, int] = {}
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        if in_shape[i] == 1:
            i += 1
            continue
        if out_shape[j] == 1:
            j += 1
            continue
        factor = f"g{len(sizes)}"
        sizes[factor] = math.gcd(in_shape[i], out_shape[j])
        in_f[i], out_f[j] = factor, factor
        in_prod, out_prod = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while in_prod != out_prod:
            if in_prod < out_prod:
                in_prod *= in_shape[i]
                i += 1
            else:
                out_prod *= out_shape[j]
                j += 1
    return tuple(in_f), tuple(out_f), sizes


@register_strategy_rule(prims.slice_p)
def _slice_strategies(ctx: StrategyContext):
    operand = ctx.avals_in[0]
    strides = ctx.params["strides"] or (1,) * operand.ndim
    full = {d for d in range(operand.ndim)
            if ctx.params["start_indices"][d] == 0 and strides[d] == 1
            and ctx.params["limit_indices"][d] == operand.shape[d]}
    names, sizes = _dims("d", operand.shape)
    dims = tuple(f if d in full else None for d, f in enumerate(names))
    return FactorRule((dims,), (dims,), tuple(sorted(sizes.items())))


@register_strategy_rule(prims.pad_p)
def _pad_strategies(ctx: StrategyContext):
    config = ctx.params["padding_config"]
    touched = {d for d, (lo, hi, interior) in enumerate(config) if lo or hi or interior}
    rule = _untouched_dims_rule(ctx, touched)
    operand_dims = tuple(None if d in touched else f"d{d}" for d in range(ctx.avals_in[0].ndim))
    sizes = dict(rule.factor_sizes)
    return dataclasses.replace(rule, operands=(operand_dims, ()),
                               factor_sizes=tuple(sorted(sizes.items())))


@register_strategy_rule(prims.concatenate_p)
def _concatenate_strategies(ctx: StrategyContext):
    dim = ctx.params["dimension"]
    names, sizes = _dims("d", ctx.avals_out[0].shape)
    dims = tuple(None if d == dim else f for d, f in enumerate(names))
    return FactorRule(tuple(dims for _ in ctx.avals_in), (dims,), tuple(sorted(sizes.items())))


@register_strategy_rule(prims.rev_p)
def _rev_strategies(ctx: StrategyContext):
    return _untouched_dims_rule(ctx, set(ctx.params["dimensions"]))


@register_strategy_rule(prims.cumsum_p, prims.cumprod_p, prims.cummax_p, prims.cummin_p,
                        prims.cumlogsumexp_p)
def _cumulative_strategies(ctx: StrategyContext):
    return _untouched_dims_rule(ctx, {ctx.params["axis"]})


@register_strategy_rule(prims.sort_p)
def _sort_strategies(ctx: StrategyContext):
    return _untouched_dims_rule(ctx, {ctx.params["dimension"]})


@register_strategy_rule(prims.dynamic_slice_p)
def _dynamic_slice_strategies(ctx: StrategyContext):
    operand = ctx.avals_in[0]
    names, sizes = _dims("d", operand.shape)
    dims = tuple(f if ctx.params["slice_sizes"][d] == operand.shape[d] else None
                 for d, f in enumerate(names))
    return FactorRule((dims,) + tuple(() for _ in ctx.avals_in[1:]), (dims,),
                      tuple(sorted(sizes.items())))


@register_strategy_rule(prims.dynamic_update_slice_p)
def _dynamic_update_slice_strategies(ctx: StrategyContext):
    operand, update = ctx.avals_in[:2]
    names, sizes = _dims("d", operand.shape)
    dims = tuple(f if update.shape[d] == operand.shape[d] else None for d, f in enumerate(names))
    return FactorRule((dims, dims) + tuple(() for _ in ctx.avals_in[2:]), (dims,),
                      tuple(sorted(sizes.items())))


def _split_strategies(ctx: StrategyContext):
    names, sizes = _dims("d", ctx.avals_in[0].shape)
    dims = tuple(None if d == ctx.params["axis"] else f for d, f in enumerate(names))
    return FactorRule((dims,), tuple(dims for _ in ctx.avals_out), tuple(sorted(sizes.items())))


if split_primitive() is not None:
    register_strategy_rule(split_primitive())(_split_strategies)


@register_strategy_rule(prims.top_k_p)
def _top_k_strategies(ctx: StrategyContext):
    """Values and indices of the top k along the last dim: every other dim splits."""
    names, sizes = _dims("d", ctx.avals_in[0].shape)
    dims = tuple(names[:-1]) + (None,)
    return FactorRule((dims,), (dims, dims), tuple(sorted(sizes.items())))


def _tile_strategies(ctx: StrategyContext):
    """A tiled dim (reps > 1) stays whole; the others split like their operand's."""
    names, sizes = _dims("d", ctx.avals_out[0].shape)
    dims = tuple(f if r == 1 else None for f, r in zip(names, ctx.params["reps"]))
    return FactorRule((dims,), (dims,), tuple(sorted(sizes.items())))


if tile_primitive() is not None:
    register_strategy_rule(tile_primitive())(_tile_strategies)


def _stack_strategies(ctx: StrategyContext):
    """``stack``: operands of one shape gain a new dim (never split) at ``axis``."""
    names, sizes = _dims("d", ctx.avals_in[0].shape)
    out = list(names)
    out.insert(ctx.params["axis"], None)
    return FactorRule(tuple(tuple(names) for _ in ctx.avals_in), (tuple(out),),
                      tuple(sorted(sizes.items())))


def _unstack_strategies(ctx: StrategyContext):
    """``unstack``: the dim at ``axis`` (never split) is taken apart."""
    names, sizes = _dims("d", ctx.avals_in[0].shape)
    axis = ctx.params["axis"]
    operand = tuple(None if d == axis else f for d, f in enumerate(names))
    result = tuple(f for d, f in enumerate(names) if d != axis)
    sizes.pop(names[axis])
    return FactorRule((operand,), tuple(result for _ in ctx.avals_out),
                      tuple(sorted(sizes.items())))


if stack_primitives():
    register_strategy_rule(stack_primitives()[0])(_stack_strategies)
    register_strategy_rule(stack_primitives()[1])(_unstack_strategies)


# --- reductions ------------------------------------------------------------------------------


@register_strategy_rule(prims.reduce_sum_p, prims.reduce_max_p, prims.reduce_min_p,
                        prims.reduce_prod_p, prims.reduce_and_p, prims.reduce_or_p)
def _reduce_strategies(ctx: StrategyContext):
    operand = ctx.avals_in[0]
    axes = set(ctx.params["axes"])
    names, sizes = _dims("d", operand.shape)
    result = tuple(f for d, f in enumerate(names) if d not in axes)
    reduction = frozenset(names[d] for d in axes)
    return FactorRule((tuple(names),), (result,), tuple(sorted(sizes.items())), reduction,
                      allow_reduce_scatter=ctx.primitive is prims.reduce_sum_p)


@register_strategy_rule(prims.argmax_p, prims.argmin_p)
def _argmax_strategies(ctx: StrategyContext):
    operand = ctx.avals_in[0]
    axes = set(ctx.params["axes"])
    names, sizes = _dims("d", operand.shape)
    dims = tuple(None if d in axes else f for d, f in enumerate(names))
    result = tuple(f for d, f in enumerate(dims) if d not in axes)
    return FactorRule((dims,), (result,), tuple(sorted(sizes.items())))


# --- contractions ----------------------------------------------------------------------------


@register_strategy_rule(prims.dot_general_p)
def _dot_general_strategies(ctx: StrategyContext):
    lhs, rhs = ctx.avals_in[:2]
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = ctx.params["dimension_numbers"]
    lhs_f: list[str | None] = [None] * lhs.ndim
    rhs_f: list[str | None] = [None] * rhs.ndim
    out_f: list[str] = []
    sizes: dict[str, int] = {}
    for i, (l, r) in enumerate(zip(lhs_batch, rhs_batch)):
        lhs_f[l] = rhs_f[r] = f"b{i}"
        sizes[f"b{i}"] = lhs.shape[l]
        out_f.append(f"b{i}")
    for i, (l, r) in enumerate(zip(lhs_contract, rhs_contract)):
        lhs_f[l] = rhs_f[r] = f"k{i}"
        sizes[f"k{i}"] = lhs.shape[l]
    for prefix, aval, dims in (("m", lhs, lhs_f), ("n", rhs, rhs_f)):
        for d in range(aval.ndim):
            if dims[d] is None:
                dims[d] = f"{prefix}{d}"
                sizes[dims[d]] = aval.shape[d]
                out_f.append(dims[d])
    reduction = frozenset(f"k{i}" for i in range(len(lhs_contract)))
    return FactorRule((tuple(lhs_f), tuple(rhs_f)), (tuple(out_f),), tuple(sorted(sizes.items())),
                      reduction, heavy=True, allow_reduce_scatter=True)


@register_strategy_rule(prims.conv_general_dilated_p)
def _conv_strategies(ctx: StrategyContext):
    lhs, rhs = ctx.avals_in[:2]
    dnums = ctx.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dnums.lhs_spec, dnums.rhs_spec, dnums.out_spec
    grouped = ctx.params["feature_group_count"] > 1
    batch_grouped = ctx.params["batch_group_count"] > 1
    lhs_f: list[str | None] = [None] * lhs.ndim
    rhs_f: list[str | None] = [None] * rhs.ndim
    out_f: list[str | None] = [None] * ctx.avals_out[0].ndim
    sizes = {}
    if not batch_grouped:
        lhs_f[lhs_spec[0]] = out_f[out_spec[0]] = "n"
        sizes["n"] = lhs.shape[lhs_spec[0]]
    if not grouped and not batch_grouped:
        lhs_f[lhs_spec[1]] = rhs_f[rhs_spec[1]] = "c"
        rhs_f[rhs_spec[0]] = out_f[out_spec[1]] = "o"
        sizes["c"], sizes["o"] = lhs.shape[lhs_spec[1]], rhs.shape[rhs_spec[0]]
    return FactorRule((tuple(lhs_f), tuple(rhs_f)), (tuple(out_f),), tuple(sorted(sizes.items())),
                      frozenset({"c"}) if "c" in sizes else frozenset(), heavy=True,
                      allow_reduce_scatter=True)


# --- windows (pooling) -----------------------------------------------------------------------


def _window_touched(params, ndim) -> set[int]:
    ones = (1,) * ndim
    strides = params.get("window_strides", ones)
    padding = params.get("padding", ((0, 0),) * ndim)
    base = params.get("base_dilation", ones) or ones
    wdil = params.get("window_dilation", ones) or ones
    return {d for d in range(ndim)
            if params["window_dimensions"][d] != 1 or strides[d] != 1 or tuple(padding[d]) != (0, 0)
            or base[d] != 1 or wdil[d] != 1}


@register_strategy_rule(prims.reduce_window_max_p, prims.reduce_window_min_p,
                        prims.reduce_window_sum_p)
def _reduce_window_strategies(ctx: StrategyContext):
    operand = ctx.avals_in[0]
    touched = _window_touched(ctx.params, operand.ndim)
    names, sizes = _dims("d", operand.shape)
    dims = tuple(None if d in touched else f for d, f in enumerate(names))
    return FactorRule((dims,), (dims,), tuple(sorted(sizes.items())))


@register_strategy_rule(prims.select_and_scatter_add_p, prims.select_and_gather_add_p)
def _select_and_scatter_strategies(ctx: StrategyContext):
    operand = ctx.avals_in[1]
    touched = _window_touched(ctx.params, operand.ndim)
    names, sizes = _dims("d", operand.shape)
    dims = tuple(None if d in touched else f for d, f in enumerate(names))
    source_dims = tuple(None if d in touched else f for d, f in enumerate(names))
    return FactorRule((source_dims, dims), (dims,), tuple(sorted(sizes.items())))


# --- gather / scatter ------------------------------------------------------------------------


@register_strategy_rule(prims.gather_p)
def _gather_strategies(ctx: StrategyContext):
    operand, indices = ctx.avals_in[:2]
    dn = ctx.params["dimension_numbers"]
    slice_sizes = ctx.params["slice_sizes"]
    out = ctx.avals_out[0]
    op_f: list[str | None] = [None] * operand.ndim
    idx_f: list[str | None] = [None] * indices.ndim
    out_f: list[str | None] = [None] * out.ndim
    sizes = {}
    batch_out = [d for d in range(out.ndim) if d not in dn.offset_dims]
    for i, d in enumerate(batch_out):
        idx_f[i] = out_f[d] = f"i{i}"
        sizes[f"i{i}"] = indices.shape[i]
    for p, idx_dim in enumerate(dn.start_indices_batching_dims):
        op_f[dn.operand_batching_dims[p]] = idx_f[idx_dim]
    skipped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    window_dims = [d for d in range(operand.ndim) if d not in skipped]
    for out_dim, od in zip(dn.offset_dims, window_dims):
        if slice_sizes[od] == operand.shape[od] and od not in dn.start_index_map:
            op_f[od] = out_f[out_dim] = f"o{od}"
            sizes[f"o{od}"] = operand.shape[od]
    return FactorRule((tuple(op_f), tuple(idx_f)), (tuple(out_f),), tuple(sorted(sizes.items())))


@register_strategy_rule(prims.scatter_add_p, prims.scatter_p)
def _scatter_strategies(ctx: StrategyContext):
    operand, indices, updates = ctx.avals_in[:3]
    dn = ctx.params["dimension_numbers"]
    op_f: list[str | None] = [None] * operand.ndim
    idx_f: list[str | None] = [None] * indices.ndim
    upd_f: list[str | None] = [None] * updates.ndim
    sizes, reduction = {}, set()
    is_add = ctx.primitive is prims.scatter_add_p
    scatter_dims = [d for d in range(updates.ndim) if d not in dn.update_window_dims]
    for i, d in enumerate(scatter_dims):
        factor = f"s{i}"
        if i in dn.scatter_indices_batching_dims:
            op_f[dn.operand_batching_dims[dn.scatter_indices_batching_dims.index(i)]] = factor
        elif is_add:
            reduction.add(factor)
        else:
            continue
        idx_f[i] = upd_f[d] = factor
        sizes[factor] = indices.shape[i]
    skipped = set(dn.inserted_window_dims) | set(dn.operand_batching_dims)
    window_dims = [d for d in range(operand.ndim) if d not in skipped]
    for upd_dim, od in zip(dn.update_window_dims, window_dims):
        if updates.shape[upd_dim] == operand.shape[od] and od not in dn.scatter_dims_to_operand_dims:
            op_f[od] = upd_f[upd_dim] = f"w{od}"
            sizes[f"w{od}"] = operand.shape[od]
    operands = (tuple(op_f), tuple(idx_f), tuple(upd_f))
    return FactorRule(operands, (tuple(op_f),), tuple(sorted(sizes.items())), frozenset(reduction))
