"""Per-primitive cost rules, grouped by family, and the operator classes (`OpClass`) of lax's
primitives and our markers.

Flops follow the usual conventions: one flop per output element for elementwise ops, 2*M*N*K
for a matmul, 2 * output elements * (kernel window * input features / groups) for a
convolution, one per input element for reductions, and body cost x trip count for loops.
"""

from __future__ import annotations

import math

from jax.extend.core import primitives as prims

from alpa_lite._jax_compat import stack_primitives, tile_primitive
from alpa_lite.loop_regions import loop_enter_p, loop_exit_p
from alpa_lite.cost.registry import (OpClass, OpCost, RuleContext, estimate_op_cost, is_elementwise,
                                    nbytes, primitives_of, register_cost_rule,
                                    register_operator_class)
from alpa_lite.markers import grad_boundary_p, layer_boundary_p, manual_boundary_p

# Elementwise primitives jax does not batch with its generic elementwise batchers (select_n,
# clamp, convert_element_type, stop_gradient, ...) or that older jax releases batch otherwise.
# Any other primitive that jax batches elementwise is found by `operator_class`.
register_operator_class(
    OpClass.ELEMENTWISE,
    prims.add_p, prims.sub_p, prims.mul_p, prims.div_p, prims.max_p, prims.min_p, prims.pow_p,
    prims.rem_p, prims.atan2_p, prims.nextafter_p, prims.add_jaxvals_p,
    prims.exp_p, prims.exp2_p, prims.log_p, prims.log1p_p, prims.expm1_p, prims.tanh_p,
    prims.logistic_p, prims.sin_p, prims.cos_p, prims.tan_p, prims.sinh_p, prims.cosh_p,
    prims.asin_p, prims.acos_p, prims.atan_p, prims.asinh_p, prims.acosh_p, prims.atanh_p,
    prims.rsqrt_p, prims.sqrt_p, prims.cbrt_p, prims.square_p, prims.integer_pow_p,
    prims.neg_p, prims.sign_p, prims.abs_p, prims.floor_p, prims.ceil_p, prims.round_p,
    prims.erf_p, prims.erfc_p, prims.erf_inv_p, prims.lgamma_p, prims.digamma_p,
    prims.is_finite_p, prims.not_p, prims.and_p, prims.or_p, prims.xor_p,
    prims.eq_p, prims.ne_p, prims.lt_p, prims.le_p, prims.gt_p, prims.ge_p,
    prims.select_n_p, prims.clamp_p, prims.convert_element_type_p, prims.copy_p,
    prims.stop_gradient_p, prims.shift_left_p, prims.shift_right_logical_p,
    prims.shift_right_arithmetic_p, prims.population_count_p, prims.clz_p,
    prims.reduce_precision_p, prims.real_p, prims.imag_p, prims.conj_p, prims.complex_p,
    prims.bitcast_convert_type_p, prims.threefry2x32_p,
)

register_operator_class(
    OpClass.DATA_MOVEMENT,
    prims.broadcast_in_dim_p, prims.reshape_p, prims.squeeze_p, prims.transpose_p,
    prims.slice_p, prims.pad_p, prims.concatenate_p, prims.rev_p, prims.iota_p,
    prims.dynamic_slice_p, prims.dynamic_update_slice_p, prims.gather_p, prims.scatter_p,
    prims.scatter_add_p, prims.scatter_mul_p, prims.scatter_min_p, prims.scatter_max_p,
    prims.sharding_constraint_p, prims.device_put_p,
    grad_boundary_p, layer_boundary_p, manual_boundary_p,
    *filter(None, [tile_primitive()]), *stack_primitives(),
)

# XLA fuses these into the loop of the operator they feed (or read from): they move no bytes
# of their own through device memory, so the roofline prices their flops only.
register_operator_class(
    OpClass.FUSED_LAYOUT,
    prims.broadcast_in_dim_p, prims.reshape_p, prims.squeeze_p, prims.iota_p,
    grad_boundary_p, layer_boundary_p, manual_boundary_p,
)

# Operators that stay kernels of their own after XLA's fusion (matmuls, convolutions,
# reductions, gathers and scatters, sorts): each pays a per-kernel latency (`op_latency_s`).
register_operator_class(
    OpClass.KERNEL,
    prims.dot_general_p, prims.conv_general_dilated_p, prims.reduce_sum_p, prims.reduce_max_p,
    prims.reduce_min_p, prims.reduce_prod_p, prims.argmax_p, prims.argmin_p, prims.cumsum_p,
    prims.cumprod_p, prims.cummax_p, prims.cummin_p, prims.cumlogsumexp_p, prims.sort_p,
    prims.top_k_p, prims.gather_p, prims.scatter_p, prims.scatter_add_p,
    prims.dynamic_update_slice_p,
)

register_operator_class(OpClass.MATMUL, prims.dot_general_p, prims.conv_general_dilated_p)

register_operator_class(
    OpClass.REDUCTION,
    prims.reduce_sum_p, prims.reduce_max_p, prims.reduce_min_p, prims.reduce_prod_p,
    prims.reduce_and_p, prims.reduce_or_p, prims.reduce_xor_p, prims.argmax_p, prims.argmin_p,
    prims.cumsum_p, prims.cumprod_p, prims.cummax_p, prims.cummin_p, prims.cumlogsumexp_p,
    prims.sort_p, prims.top_k_p,
)


@register_cost_rule(*primitives_of(OpClass.ELEMENTWISE), derived=is_elementwise)
def _elementwise_cost(ctx: RuleContext, **_) -> OpCost:
    out = ctx.avals_out[0]
    return OpCost(flops=float(math.prod(out.shape)), hbm_bytes=nbytes(*ctx.avals_in, *ctx.avals_out))


@register_cost_rule(*primitives_of(OpClass.DATA_MOVEMENT))
def _data_movement_cost(ctx: RuleContext, **_) -> OpCost:
    return OpCost(hbm_bytes=nbytes(*ctx.avals_in, *ctx.avals_out))


@register_cost_rule(*primitives_of(OpClass.REDUCTION))
def _reduction_cost(ctx: RuleContext, **_) -> OpCost:
    return OpCost(
        flops=float(math.prod(ctx.avals_in[0].shape)),
        hbm_bytes=nbytes(*ctx.avals_in, *ctx.avals_out),
    )


@register_cost_rule(prims.dot_general_p)
def _dot_general_cost(ctx: RuleContext, *, dimension_numbers, **_) -> OpCost:
    lhs, rhs = ctx.avals_in[:2]
    (out,) = ctx.avals_out
    (lhs_contracting, _), _ = dimension_numbers
    contracting = math.prod(lhs.shape[d] for d in lhs_contracting)
    return OpCost(flops=2.0 * math.prod(out.shape) * contracting, hbm_bytes=nbytes(lhs, rhs, out))


@register_cost_rule(prims.conv_general_dilated_p)
def _conv_cost(ctx: RuleContext, *, dimension_numbers, feature_group_count, **_) -> OpCost:
    lhs, rhs = ctx.avals_in[:2]
    (out,) = ctx.avals_out
    rhs_spec = dimension_numbers.rhs_spec  # (out feature, in feature, spatial...)
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    in_features = rhs.shape[rhs_spec[1]]
    return OpCost(
        flops=2.0 * math.prod(out.shape) * window * in_features,
        hbm_bytes=nbytes(lhs, rhs, out),
    )


@register_cost_rule(prims.reduce_window_max_p, prims.reduce_window_min_p,
                    prims.reduce_window_sum_p, prims.reduce_window_p)
def _reduce_window_cost(ctx: RuleContext, *, window_dimensions, **_) -> OpCost:
    out = ctx.avals_out[0]
    return OpCost(
        flops=float(math.prod(out.shape) * math.prod(window_dimensions)),
        hbm_bytes=nbytes(*ctx.avals_in, *ctx.avals_out),
    )


@register_cost_rule(prims.select_and_scatter_add_p, prims.select_and_gather_add_p)
def _select_and_scatter_cost(ctx: RuleContext, *, window_dimensions, **_) -> OpCost:
    source = ctx.avals_in[0]
    return OpCost(
        flops=2.0 * math.prod(source.shape) * math.prod(window_dimensions),
        hbm_bytes=nbytes(*ctx.avals_in, *ctx.avals_out),
    )


def estimate_jaxpr_cost(jaxpr) -> OpCost:
    """Sums the cost of every equation of a (sub-)jaxpr, recursing into control flow."""
    total = OpCost()
    for eqn in jaxpr.eqns:
        total += estimate_op_cost(eqn.primitive, eqn.params,
                                  [v.aval for v in eqn.invars], [v.aval for v in eqn.outvars])
    return total


@register_cost_rule(loop_enter_p, loop_exit_p, prims.empty2_p)
def _loop_border_cost(ctx: RuleContext, **_) -> OpCost:
    # The body's nodes carry the loop's compute; reading a slice of ``xs`` or writing one of
    # ``ys`` is a copy XLA does in place (dynamic-slice / dynamic-update-slice). empty2 (in
    # transposed conds) allocates without writing.
    return OpCost()


@register_cost_rule(prims.scan_p)
def _scan_cost(ctx: RuleContext, *, jaxpr, length, **_) -> OpCost:
    return estimate_jaxpr_cost(jaxpr.jaxpr) * length


@register_cost_rule(prims.while_p)
def _while_cost(ctx: RuleContext, *, body_jaxpr, cond_jaxpr, **_) -> OpCost:
    # The trip count is unknown statically; count one iteration and say so in the docs.
    return estimate_jaxpr_cost(body_jaxpr.jaxpr) + estimate_jaxpr_cost(cond_jaxpr.jaxpr)


@register_cost_rule(prims.cond_p)
def _cond_cost(ctx: RuleContext, *, branches, **_) -> OpCost:
    costs = [estimate_jaxpr_cost(b.jaxpr) for b in branches]
    return max(costs, key=lambda c: c.flops)


@register_cost_rule(prims.remat_p)
def _remat_cost(ctx: RuleContext, *, jaxpr, **_) -> OpCost:
    return estimate_jaxpr_cost(jaxpr)


@register_cost_rule(prims.jit_p, prims.custom_jvp_call_p, prims.custom_vjp_call_p)
def _call_cost(ctx: RuleContext, **params) -> OpCost:
    sub = params.get("jaxpr") or params.get("call_jaxpr")
    return estimate_jaxpr_cost(sub.jaxpr)
