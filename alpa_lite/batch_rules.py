"""How batch dependence flows through each primitive: the rules of the micro-batch analysis.

`alpa_lite.micro_batching` interprets a step traced at micro-batch size and at full batch
size in lockstep, with one abstract `Val` per value:

* ``CONST``: independent of the batch. ``invariant``: equal in both traces; ``num``: the
  (micro, full) value when every element is one number (``1 / batch_size``, say).
* ``BATCH``: per-example: along ``dim`` each ``group`` consecutive elements depend on one
  example only (``group`` 0: every row along ``dim`` is alike, a constant broadcast along
  the batch, which fits any grouping), and the full-batch value of an example is ``ratio``
  times its micro-batch value (1 for activations; 1/k for cotangents of a mean loss, seeded
  with 1/batch_size).
  ``zero``: every element is 0 in both traces (a zero cotangent), which any ratio fits.
* ``SUM``: ``c * sum over examples`` (+ a batch-independent offset when ``affine``);
  ``ratio`` is the full-batch ``c`` over the micro-batch ``c``: 1 for a sum, 1/k for a mean.
* ``MAX`` / ``MIN``: a maximum / minimum over examples.
* ``OPAQUE``: depends on the batch in a way no rule follows; ``origin`` says where and why.

A rule here is keyed by primitive (`register_batch_rule`), like `alpa_lite.cost.registry`:
it gets an operator whose operands include per-example values and returns the `Val` of each
result. Elementwise primitives share one rule (`alpa_lite.cost.is_elementwise` finds
them, new ones included). A primitive without a rule makes its results OPAQUE, and an error
names it with its source line if such a value must be combined over micro-batches. Two more
registries keyed by primitive say which primitives carry values of any kind unchanged
(`register_identity`) or move their elements (`register_data_movement`: a sum over examples
stays one); `alpa_lite.micro_batching` queries them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Callable

import numpy as np
from jax.extend.core import primitives as prims

from alpa_lite._jax_compat import (optimization_barrier_primitive, split_primitive,
                                   stack_primitives, tile_primitive)
from alpa_lite.cost import is_elementwise
from alpa_lite.markers import grad_boundary_p, layer_boundary_p, manual_boundary_p


class Kind(enum.Enum):
    CONST = 0
    BATCH = 1
    SUM = 2
    MAX = 3
    MIN = 4
    OPAQUE = 5


@dataclasses.dataclass(frozen=True)
class Val:
    """The abstract value of one variable (see the module docstring)."""

    kind: Kind
    dim: int = -1
    group: int = 1
    ratio: float = 1.0
    affine: bool = False
    invariant: bool = True
    num: tuple | None = None
    zero: bool = False
    origin: Any = dataclasses.field(default=None, compare=False)  # OPAQUE: (node, reason)


def opaque(node, reason: str) -> Val:
    """An OPAQUE value that lost its batch dependence at ``node`` for ``reason``."""
    return Val(Kind.OPAQUE, origin=(node, reason))


def const_zero() -> Val:
    return Val(Kind.CONST, num=(0.0, 0.0))


@dataclasses.dataclass(frozen=True)
class RuleContext:
    """What a batch rule sees: the operator, its operands' values, and per result the dim
    whose full size is k times its micro size (None: no such dim; -2: no single one)."""

    node: Any
    ins: list
    out_dims: list
    avals_in: list
    avals_out: list

    def batch_operands(self) -> list[tuple[int, Val]]:
        return [(i, x) for i, x in enumerate(self.ins) if x.kind is Kind.BATCH]

    def fail(self, reason: str) -> list[Val]:
        return [opaque(self.node, reason)] * len(self.node.outvars)


BatchRule = Callable[[RuleContext], "list[Val]"]
_RULES: dict[object, BatchRule] = {}
_DERIVED: list[tuple[Callable[[object], bool], BatchRule]] = []


def register_batch_rule(*primitives, derived: Callable[[object], bool] | None = None):
    """Decorator registering a batch rule for ``primitives`` and, with ``derived``, for every
    other primitive it accepts."""

    def register(rule: BatchRule) -> BatchRule:
        for primitive in primitives:
            if primitive in _RULES:
                raise ValueError(f"A batch rule for {primitive.name!r} is already registered.")
            _RULES[primitive] = rule
        if derived is not None:
            _DERIVED.append((derived, rule))
        return rule

    return register


def apply_batch_rule(ctx: RuleContext) -> list[Val]:
    """The values of an operator's results, some of whose operands are per-example."""
    primitive = ctx.node.primitive
    rule = _RULES.get(primitive)
    if rule is None:
        rule = next((r for accepts, r in _DERIVED if accepts(primitive)), None)
    if rule is None:
        return ctx.fail(f"no micro-batch rule for `{primitive.name}` (register one with "
                        "alpa_lite.batch_rules.register_batch_rule)")
    return rule(ctx)


# --- values of any kind: identities and data movement ----------------------------------------

_IDENTITIES: set = set()
_MOVES: dict[object, int | None] = {}


def register_identity(*primitives) -> None:
    """Registers ``primitives`` as identities: each result is its operand, whatever its kind
    (markers, copies, remat's barrier)."""
    _IDENTITIES.update(primitives)


def is_identity(primitive) -> bool:
    return primitive in _IDENTITIES


def register_data_movement(*primitives, indices_from: int | None = None) -> None:
    """Registers ``primitives`` as data movement: each result element is an operand element
    (or filler), so a sum, maximum or minimum over examples stays one. Operands from
    ``indices_from`` on (None: none) are indices, not data."""
    _MOVES.update(dict.fromkeys(primitives, indices_from))


def index_operands(primitive, num_operands: int) -> range | None:
    """The positions of the index operands of a data movement ``primitive`` (None: it is not
    registered as data movement)."""
    if primitive not in _MOVES:
        return None
    first = _MOVES[primitive]
    return range(num_operands if first is None else first, num_operands)


register_identity(prims.copy_p, prims.stop_gradient_p, prims.reduce_precision_p,
                  layer_boundary_p, manual_boundary_p, grad_boundary_p,
                  optimization_barrier_primitive())
register_data_movement(prims.pad_p, prims.slice_p, prims.rev_p, prims.concatenate_p,
                       prims.transpose_p, prims.reshape_p, prims.squeeze_p,
                       prims.broadcast_in_dim_p, prims.copy_p,
                       *filter(None, (split_primitive(), tile_primitive())), *stack_primitives())
register_data_movement(prims.gather_p, prims.dynamic_slice_p, indices_from=1)
register_data_movement(prims.dynamic_update_slice_p, indices_from=2)


# --- scales ----------------------------------------------------------------------------------


def scale_of(x: Val) -> float | None:
    """Full over micro value of a per-example or constant operand (0.0 for zeros; None when
    the two traces' values are not one multiple of each other)."""
    if x.kind is Kind.BATCH:
        return 0.0 if x.zero else x.ratio
    if x.num == (0.0, 0.0):
        return 0.0
    if x.invariant:
        return 1.0
    if x.num is not None:
        micro, full = x.num
        if micro == 0 or not (math.isfinite(micro) and math.isfinite(full)):
            return None
        return full / micro
    return None


def per_example(dim: int, group: int, ratio: float | None) -> Val | None:
    """A BATCH value (``ratio`` 0.0: zeros), or None when the ratio is unknown."""
    if ratio is None:
        return None
    if ratio == 0.0:
        return Val(Kind.BATCH, dim=dim, group=group, zero=True)
    return Val(Kind.BATCH, dim=dim, group=group, ratio=ratio)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


def _common_scale(scales: list) -> float | None:
    """The one scale shared by all non-zero operands (0.0: all zero), else None."""
    if any(s is None for s in scales):
        return None
    nonzero = [s for s in scales if s != 0.0]
    if not nonzero:
        return 0.0
    return nonzero[0] if all(_close(s, nonzero[0]) for s in nonzero) else None


def _unscaled(ctx: RuleContext) -> bool:
    """Every operand equal in both traces (per example): a non-linear op keeps ratio 1."""
    return all(scale_of(x) is not None and (_close(scale_of(x), 1.0) or
                                            (x.kind is Kind.CONST and x.invariant))
               for x in ctx.ins if x.kind in (Kind.BATCH, Kind.CONST))


# --- elementwise -----------------------------------------------------------------------------

_SCALE_PRESERVING = {prims.neg_p, prims.copy_p, prims.reduce_precision_p, prims.real_p,
                     prims.imag_p, prims.conj_p}
_ADDITIVE = {prims.add_p, prims.sub_p, prims.add_jaxvals_p}
_POSITIVE_HOMOGENEOUS = {prims.max_p, prims.min_p}  # max(r x, r y) = r max(x, y) for r > 0


@register_batch_rule(derived=is_elementwise)
def _elementwise(ctx: RuleContext) -> list[Val]:
    first = joint_layout(ctx.ins)
    out_dim = ctx.out_dims[0]
    if first is None or out_dim is None or out_dim < 0:
        return ctx.fail("per-example operands laid out along different dims")
    ratio = _elementwise_scale(ctx)
    if ratio is None:
        return ctx.fail("a non-linear function of values whose scale changes with the batch "
                        "size (e.g. of a cotangent seeded with 1/batch_size)")
    return [per_example(out_dim, first.group, ratio)] * len(ctx.node.outvars)


def _elementwise_scale(ctx: RuleContext) -> float | None:
    prim, ins = ctx.node.primitive, ctx.ins
    scales = [scale_of(x) for x in ins]
    if prim is prims.mul_p:
        if 0.0 in scales:
            return 0.0
        return None if None in scales else float(np.prod(scales))
    if prim is prims.div_p:
        if scales[0] == 0.0:
            return 0.0
        if None in scales or scales[1] == 0.0:
            return None
        return scales[0] / scales[1]
    if prim in _SCALE_PRESERVING or (prim is prims.convert_element_type_p and np.issubdtype(
            np.dtype(ctx.avals_out[0].dtype), np.inexact)):
        return scales[0]
    if prim in _ADDITIVE:
        return _common_scale(scales)
    if prim is prims.select_n_p:
        if scales[0] is None or not (_close(scales[0], 1.0) or ins[0].kind is Kind.CONST):
            return None  # the predicate must be the same in both traces
        return _common_scale(scales[1:])
    if prim in _POSITIVE_HOMOGENEOUS:
        common = _common_scale(scales)
        return common if common is not None and common >= 0 and 0.0 not in scales else (
            1.0 if _unscaled(ctx) else None)
    return 1.0 if _unscaled(ctx) else None


# --- layout: the batch dim moves, examples stay apart ----------------------------------------


@register_batch_rule(prims.broadcast_in_dim_p)
def _broadcast(ctx: RuleContext) -> list[Val]:
    x = ctx.ins[0]
    out_dim = ctx.out_dims[0]
    if x.kind is not Kind.BATCH or out_dim is None or \
            ctx.node.params["broadcast_dimensions"][x.dim] != out_dim:
        return ctx.fail("a broadcast that moves the batch dim")
    return [dataclasses.replace(x, dim=out_dim)]


@register_batch_rule(prims.transpose_p)
def _transpose(ctx: RuleContext) -> list[Val]:
    x = ctx.ins[0]
    return [dataclasses.replace(x, dim=ctx.node.params["permutation"].index(x.dim))]


@register_batch_rule(prims.reshape_p, prims.squeeze_p)
def _reshape(ctx: RuleContext) -> list[Val]:
    x = ctx.ins[0]
    out_dim = ctx.out_dims[0]
    if out_dim is None or out_dim < 0:
        return ctx.fail("a reshape that mixes examples")
    group = reshaped_group(ctx.avals_in[0].shape, ctx.avals_out[0].shape, x, out_dim)
    if group is None:
        return ctx.fail("a reshape that mixes examples (the batch dim is not the major part "
                        "of the dims it is merged with)")
    return [dataclasses.replace(x, dim=out_dim, group=group)]


def reshaped_group(in_shape, out_shape, value: Val, out_dim: int) -> int | None:
    """Group size after a shape-only op, or None when examples no longer stay apart.

    Examples keep their elements together when the batch dim stays the major part of the
    dims it is merged with (``(b, s) -> (b * s)``, not ``(s, b) -> (s * b)``).
    """
    d, g = value.dim, value.group
    if math.prod(in_shape[:d]) != math.prod(out_shape[:out_dim]):
        return None
    minor_in, minor_out = math.prod(in_shape[d + 1:]), math.prod(out_shape[out_dim + 1:])
    if (max(g, 1) * minor_in) % minor_out:
        return None
    if g == 0 and minor_in == minor_out:
        return 0  # rows stay alike
    return max(g, 1) * minor_in // minor_out


def joint_layout(values) -> Val | None:
    """The first per-example value with the group all share (rows alike fit any group), or
    None when their layouts differ."""
    batch = [x for x in values if x.kind is Kind.BATCH]
    groups = {x.group for x in batch} - {0}
    if len(groups) > 1 or any(x.dim != batch[0].dim for x in batch):
        return None
    return dataclasses.replace(batch[0], group=groups.pop() if groups else 0)


def _same_dim_operands(ctx: RuleContext) -> Val | None:
    return joint_layout(ctx.ins)


def _keep(ctx: RuleContext, ratio: float | None, reason: str) -> list[Val]:
    """Every result per-example along its batch dim with ``ratio``, or a failure."""
    x = _same_dim_operands(ctx)
    if x is None or ratio is None or any(d is None or d < 0 for d in ctx.out_dims):
        return ctx.fail(reason)
    return [per_example(d, x.group, ratio) for d in ctx.out_dims]


# --- operators along other dims: the batch dim passes through --------------------------------

# What reducing the batch dim away makes: a sum, or a maximum / minimum over examples.
REDUCTION_KINDS = {prims.reduce_sum_p: Kind.SUM, prims.reduce_max_p: Kind.MAX,
                   prims.reduce_min_p: Kind.MIN, prims.reduce_or_p: Kind.MAX,
                   prims.reduce_and_p: Kind.MIN}


@register_batch_rule(prims.reduce_sum_p, prims.reduce_max_p, prims.reduce_min_p,
                     prims.reduce_or_p, prims.reduce_and_p, prims.reduce_prod_p,
                     prims.argmax_p, prims.argmin_p, prims.reduce_xor_p)
def _reduce(ctx: RuleContext) -> list[Val]:
    x = ctx.ins[0]
    prim = ctx.node.primitive
    axes = ctx.node.params["axes"]
    if x.dim not in axes:
        linear = prim is prims.reduce_sum_p
        return _keep(ctx, scale_of(x) if linear else (1.0 if _unscaled(ctx) else None),
                     f"`{prim.name}` of values whose scale changes with the batch size")
    if x.zero:
        return [const_zero()]
    if prim is prims.reduce_sum_p:
        return [Val(Kind.SUM, ratio=x.ratio)]
    if prim in REDUCTION_KINDS and _close(x.ratio, 1.0):
        return [Val(REDUCTION_KINDS[prim])]
    return ctx.fail(f"`{prim.name}` over the batch dim, which no combination of micro-batch "
                    "results reproduces")


@register_batch_rule(prims.cumsum_p, prims.cumprod_p, prims.cummax_p, prims.cummin_p,
                     prims.cumlogsumexp_p)
def _cumulative(ctx: RuleContext) -> list[Val]:
    x = ctx.ins[0]
    if ctx.node.params["axis"] == x.dim:
        return ctx.fail(f"`{ctx.node.primitive.name}` along the batch dim")
    ratio = scale_of(x) if ctx.node.primitive is prims.cumsum_p else (
        1.0 if _unscaled(ctx) else None)
    return _keep(ctx, ratio, "a cumulative op on scaled values")


@register_batch_rule(prims.sort_p)
def _sort(ctx: RuleContext) -> list[Val]:
    x = _same_dim_operands(ctx)
    if x is None or ctx.node.params["dimension"] == x.dim:
        return ctx.fail("a sort along the batch dim")
    return _keep(ctx, 1.0 if _unscaled(ctx) else None, "a sort of scaled values")


@register_batch_rule(prims.top_k_p)
def _top_k(ctx: RuleContext) -> list[Val]:
    x = ctx.ins[0]
    if x.dim == len(ctx.avals_in[0].shape) - 1:
        return ctx.fail("top_k along the batch dim")
    return _keep(ctx, 1.0 if _unscaled(ctx) else None, "top_k of scaled values")


@register_batch_rule(prims.rev_p)
def _rev(ctx: RuleContext) -> list[Val]:
    x = ctx.ins[0]
    if x.dim in ctx.node.params["dimensions"]:
        return ctx.fail("a reversal of the batch dim")
    return _keep(ctx, scale_of(x), "")


@register_batch_rule(prims.concatenate_p)
def _concatenate(ctx: RuleContext) -> list[Val]:
    x = _same_dim_operands(ctx)
    if x is None or ctx.node.params["dimension"] == x.dim or \
            len(ctx.batch_operands()) != len(ctx.ins):
        return ctx.fail("a concatenation along the batch dim")
    return _keep(ctx, _common_scale([scale_of(y) for y in ctx.ins]),
                 "a concatenation of values with different scales")


if split_primitive() is not None:
    @register_batch_rule(split_primitive())
    def _split(ctx: RuleContext) -> list[Val]:
        x = ctx.ins[0]
        if ctx.node.params["axis"] == x.dim:
            return ctx.fail("a split along the batch dim")
        return _keep(ctx, scale_of(x), "")


@register_batch_rule(prims.pad_p)
def _pad(ctx: RuleContext) -> list[Val]:
    x, padding = ctx.ins
    if x.kind is not Kind.BATCH or tuple(ctx.node.params["padding_config"][x.dim]) != (0, 0, 0):
        return ctx.fail("padding along the batch dim")
    return _keep(ctx, _common_scale([scale_of(x), scale_of(padding)]),
                 "padding of a scaled value with a non-zero constant")


@register_batch_rule(prims.slice_p)
def _slice(ctx: RuleContext) -> list[Val]:
    x = ctx.ins[0]
    params, shape = ctx.node.params, ctx.avals_in[0].shape
    whole = (params["start_indices"][x.dim] == 0 and params["limit_indices"][x.dim] == shape[x.dim]
             and (params["strides"] is None or params["strides"][x.dim] == 1))
    return _keep(ctx, scale_of(x) if whole else None, "a slice of the batch dim")


@register_batch_rule(prims.dynamic_slice_p)
def _dynamic_slice(ctx: RuleContext) -> list[Val]:
    x = ctx.ins[0]
    whole = x.kind is Kind.BATCH and len(ctx.batch_operands()) == 1 and \
        ctx.node.params["slice_sizes"][x.dim] == ctx.avals_in[0].shape[x.dim]
    return _keep(ctx, scale_of(x) if whole else None,
                 "a dynamic slice of the batch dim, or at per-example offsets")


@register_batch_rule(prims.dynamic_update_slice_p)
def _dynamic_update_slice(ctx: RuleContext) -> list[Val]:
    operand, update = ctx.ins[:2]
    whole = (operand.kind is Kind.BATCH and update.kind is Kind.BATCH
             and all(x.kind is Kind.CONST for x in ctx.ins[2:])
             and ctx.avals_in[1].shape[operand.dim] == ctx.avals_in[0].shape[operand.dim])
    return _keep(ctx, _common_scale([scale_of(operand), scale_of(update)]) if whole else None,
                 "an update of part of the batch dim")


@register_batch_rule(prims.dot_general_p)
def _dot_general(ctx: RuleContext) -> list[Val]:
    (contract_l, contract_r), _ = ctx.node.params["dimension_numbers"]
    lhs, rhs = ctx.ins
    scales = [scale_of(lhs), scale_of(rhs)]
    ratio = None if None in scales else scales[0] * scales[1]
    l_contracted = lhs.kind is Kind.BATCH and lhs.dim in contract_l
    r_contracted = rhs.kind is Kind.BATCH and rhs.dim in contract_r
    if not l_contracted and not r_contracted:
        return _keep(ctx, ratio, "a product with a constant that changes with the batch size")
    if l_contracted and r_contracted and contract_l.index(lhs.dim) == contract_r.index(rhs.dim) \
            and ratio is not None:
        return [const_zero()] if ratio == 0.0 else [Val(Kind.SUM, ratio=ratio)]
    return ctx.fail("a contraction of the batch dim with a dim that is not the batch")


@register_batch_rule(prims.gather_p)
def _gather(ctx: RuleContext) -> list[Val]:
    numbers = ctx.node.params["dimension_numbers"]
    operand, indices = ctx.ins
    if indices.kind is Kind.BATCH and scale_of(indices) != 1.0:
        return ctx.fail("gather indices that change with the batch size")
    if operand.kind is Kind.BATCH and indices.kind is Kind.BATCH:
        ob, ib = numbers.operand_batching_dims, numbers.start_indices_batching_dims
        keeps = operand.dim in ob and indices.dim in ib and \
            ob.index(operand.dim) == ib.index(indices.dim)
    elif operand.kind is Kind.BATCH:  # constant indices: the batch dim must be taken whole
        keeps = operand.dim not in numbers.start_index_map and \
            operand.dim not in numbers.collapsed_slice_dims and \
            ctx.node.params["slice_sizes"][operand.dim] == ctx.avals_in[0].shape[operand.dim]
    else:  # a constant table, per-example indices (an embedding lookup)
        keeps = operand.invariant
    ratio = scale_of(operand) if operand.kind is Kind.BATCH else 1.0
    return _keep(ctx, ratio if keeps else None, "a gather across examples")


@register_batch_rule(prims.scatter_add_p)
def _scatter_add(ctx: RuleContext) -> list[Val]:
    """A scatter-add of per-example updates into a table (an embedding's gradient) sums over
    examples; one within examples (batching dims) keeps them apart."""
    operand, indices, updates = ctx.ins[:3]
    numbers = ctx.node.params["dimension_numbers"]
    if ctx.out_dims[0] is None and operand.kind is Kind.CONST and updates.kind is Kind.BATCH \
            and indices.kind is Kind.BATCH and scale_of(indices) == 1.0:
        update_scatter = [d for d in range(len(ctx.avals_in[2].shape))
                          if d not in numbers.update_window_dims]
        index_vector_dim = len(ctx.avals_in[1].shape) - 1
        index_batch = [d for d in range(len(ctx.avals_in[1].shape)) if d != index_vector_dim]
        if updates.dim in update_scatter and indices.dim in index_batch and \
                update_scatter.index(updates.dim) == index_batch.index(indices.dim):
            if updates.zero:
                return [operand]
            zero_table = scale_of(operand) == 0.0
            if zero_table or operand.invariant:
                return [Val(Kind.SUM, ratio=updates.ratio, affine=not zero_table)]
    if operand.kind is Kind.BATCH and ctx.out_dims[0] == operand.dim and \
            updates.kind is Kind.BATCH and scale_of(indices) == 1.0:
        if _scatter_keeps_batch(numbers, operand, indices, updates, ctx.avals_in):
            return _keep(ctx, _common_scale([scale_of(operand), scale_of(updates)]),
                         "a scatter of values with different scales")
    return ctx.fail("a scatter across examples")


def _scatter_keeps_batch(numbers, operand: Val, indices: Val, updates: Val, avals) -> bool:
    """Does a scatter write each example's updates into that example only?"""
    if operand.dim in numbers.operand_batching_dims:  # batched indices, example by example
        at = numbers.operand_batching_dims.index(operand.dim)
        return indices.kind is Kind.BATCH and \
            numbers.scatter_indices_batching_dims[at] == indices.dim
    # Otherwise the batch dim must be a window dim the updates cover whole (the transpose
    # of a gather that takes the batch whole, e.g. x[:, 0]'s gradient).
    window = [d for d in range(len(avals[0].shape)) if d not in numbers.inserted_window_dims
              and d not in numbers.operand_batching_dims]
    if operand.dim in numbers.scatter_dims_to_operand_dims or operand.dim not in window:
        return False
    update_dim = numbers.update_window_dims[window.index(operand.dim)]
    return updates.dim == update_dim and \
        avals[2].shape[update_dim] == avals[0].shape[operand.dim] and \
        indices.kind is Kind.CONST


def _conv_specs(params):
    numbers = params["dimension_numbers"]
    return numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec


@register_batch_rule(prims.conv_general_dilated_p)
def _conv(ctx: RuleContext) -> list[Val]:
    """A convolution of per-example inputs with a constant kernel (the forward pass and the
    input gradient), or one contracting the batch (the kernel gradient: jax's transpose
    convolves inputs and cotangents with the batch as their feature dim)."""
    lhs, rhs = ctx.ins
    params = ctx.node.params
    lhs_spec, rhs_spec, out_spec = _conv_specs(params)
    scales = [scale_of(lhs), scale_of(rhs)]
    ratio = None if None in scales else scales[0] * scales[1]
    if params["batch_group_count"] == 1 and lhs.kind is Kind.BATCH and \
            lhs.dim == lhs_spec[0] and rhs.kind is Kind.CONST:
        return _keep(ctx, ratio if ctx.out_dims[0] == out_spec[0] else None,
                     "a convolution with a kernel that changes with the batch size")
    if lhs.kind is Kind.BATCH and rhs.kind is Kind.BATCH and ctx.out_dims[0] is None and \
            params["feature_group_count"] == 1 and params["batch_group_count"] == 1 and \
            lhs.dim == lhs_spec[1] and rhs.dim == rhs_spec[1] and ratio is not None:
        return [const_zero()] if ratio == 0.0 else [Val(Kind.SUM, ratio=ratio)]
    return ctx.fail("a convolution that mixes examples (batch_group_count, or the batch "
                    "along a spatial dim)")


@register_batch_rule(prims.reduce_window_sum_p, prims.reduce_window_max_p,
                     prims.reduce_window_min_p, prims.select_and_scatter_add_p,
                     prims.select_and_gather_add_p)
def _window(ctx: RuleContext) -> list[Val]:
    """Pooling and its gradients: a window of 1 along the batch dim keeps examples apart."""
    params = ctx.node.params
    x = _same_dim_operands(ctx)
    if x is None:
        return ctx.fail("a window op over per-example values laid out differently")
    pads = params.get("padding") or ((0, 0),) * (x.dim + 1)
    strides = params.get("window_strides") or (1,) * (x.dim + 1)
    alone = (params["window_dimensions"][x.dim] == 1 and strides[x.dim] == 1
             and tuple(pads[x.dim]) == (0, 0))
    if not alone:
        return ctx.fail("a window that spans several examples")
    linear = ctx.node.primitive in (prims.reduce_window_sum_p, prims.select_and_scatter_add_p,
                                    prims.select_and_gather_add_p)
    scales = [scale_of(y) for y in ctx.ins]
    if ctx.node.primitive in (prims.select_and_scatter_add_p, prims.select_and_gather_add_p):
        # (source or tangents, operand): linear in the first, the second picks positions.
        ratio = scales[0] if scales[1] is not None and (
            _close(scales[1], 1.0) or ctx.ins[1].kind is Kind.CONST) else None
    else:
        ratio = scales[0] if linear else (1.0 if _unscaled(ctx) else None)
    return _keep(ctx, ratio, "a max-pooling of scaled values")


if tile_primitive() is not None:
    @register_batch_rule(tile_primitive())
    def _tile(ctx: RuleContext) -> list[Val]:
        x = ctx.ins[0]
        if ctx.node.params["reps"][x.dim] != 1:
            return ctx.fail("a tiling that repeats examples")
        return _keep(ctx, scale_of(x), "")


if stack_primitives():
    @register_batch_rule(stack_primitives()[0])
    def _stack(ctx: RuleContext) -> list[Val]:
        x = _same_dim_operands(ctx)
        axis = ctx.node.params["axis"]
        if x is None or len(ctx.batch_operands()) != len(ctx.ins) or \
                ctx.out_dims[0] != x.dim + (axis <= x.dim):
            return ctx.fail("a stack of values laid out differently")
        return _keep(ctx, _common_scale([scale_of(y) for y in ctx.ins]),
                     "a stack of values with different scales")

    @register_batch_rule(stack_primitives()[1])
    def _unstack(ctx: RuleContext) -> list[Val]:
        x = ctx.ins[0]
        if ctx.node.params["axis"] == x.dim:
            return ctx.fail("an unstack of the batch dim")
        return _keep(ctx, scale_of(x), "")
