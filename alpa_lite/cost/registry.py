"""Cost rules: a registry from primitive to a function estimating its compute and memory traffic.

Rules see abstract values only (`RuleContext`) and return an `OpCost` for the whole (unsharded)
operator; sharding divides it later. A primitive without a rule gets the visible fallback
"bytes in + bytes out, 0 flops" and is reported by `has_cost_rule`.

A second registry keyed by primitive holds its operator classes (`OpClass`: elementwise, data
movement, fused layout, kernel, reduction), which the cost rules, the planner's roofline and
memory model, and the strategy and micro-batch rules query through `operator_class`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable, Protocol

import numpy as np

from alpa_lite._jax_compat import batched_elementwise


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class OpCost:
    """Cost of one operator on one device, before communication.

    Example:
        >>> OpCost(flops=2.0, hbm_bytes=8.0) * 3 + OpCost(flops=1.0)
        OpCost(flops=7.0, hbm_bytes=24.0)
    """

    flops: float = 0.0
    hbm_bytes: float = 0.0

    def __add__(self, other: "OpCost") -> "OpCost":
        return OpCost(flops=self.flops + other.flops, hbm_bytes=self.hbm_bytes + other.hbm_bytes)

    def __mul__(self, factor: float) -> "OpCost":
        return OpCost(flops=self.flops * factor, hbm_bytes=self.hbm_bytes * factor)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RuleContext:
    """What a cost rule may look at: abstract values only."""

    primitive: object
    avals_in: tuple
    avals_out: tuple


class CostRule(Protocol):
    def __call__(self, ctx: RuleContext, **params) -> OpCost: ...


_COST_RULES: dict[object, CostRule] = {}
# (predicate, rule): the rule of every primitive without one of its own that the predicate
# accepts (e.g. elementwise primitives a newer jax adds).
_DERIVED_RULES: list[tuple[Callable[[object], bool], CostRule]] = []


def register_cost_rule(*primitives, derived: Callable[[object], bool] | None = None
                       ) -> Callable[[CostRule], CostRule]:
    """Decorator registering a cost rule for ``primitives`` (primitive objects, not names)
    and, with ``derived``, for every other primitive that ``derived(primitive)`` accepts."""

    def register(rule: CostRule) -> CostRule:
        if derived is not None:
            _DERIVED_RULES.append((derived, rule))
        for primitive in primitives:
            if primitive in _COST_RULES:
                raise ValueError(
                    f"A cost rule for {primitive.name!r} is already registered "
                    f"({_COST_RULES[primitive].__qualname__})."
                )
            _COST_RULES[primitive] = rule
        return rule

    return register


def _rule_for(primitive) -> CostRule | None:
    rule = _COST_RULES.get(primitive)
    if rule is None:
        rule = next((r for accepts, r in _DERIVED_RULES if accepts(primitive)), None)
    return rule


def has_cost_rule(primitive) -> bool:
    return _rule_for(primitive) is not None


def nbytes(*avals) -> float:
    """Total bytes of abstract values (tokens and other non-arrays count 0)."""
    total = 0.0
    for aval in avals:
        shape = getattr(aval, "shape", None)
        dtype = getattr(aval, "dtype", None)
        if shape is None or dtype is None:
            continue
        total += math.prod(shape) * itemsize(dtype)
    return total


def itemsize(dtype) -> int:
    """Bytes per element, also for PRNG key dtypes (``key<fry>`` is two uint32 words).

    Example:
        >>> import jax
        >>> itemsize(np.float32), itemsize(jax.random.key(0).dtype)
        (4, 8)
    """
    size = getattr(dtype, "itemsize", None)
    return int(size) if size is not None else np.dtype(dtype).itemsize


def compute_dtype_name(avals_in, avals_out) -> str:
    """The dtype an operator computes in: its first floating-point operand's, else its output's.

    Operands come first because a mixed-precision matmul (bf16 operands, f32 result via
    ``preferred_element_type``) runs at the bf16 rate. ``"float32"`` when nothing has a dtype.

    Example:
        >>> import jax
        >>> bf16 = jax.ShapeDtypeStruct((2, 2), jax.numpy.bfloat16)
        >>> f32 = jax.ShapeDtypeStruct((2, 2), np.float32)
        >>> i32 = jax.ShapeDtypeStruct((2,), np.int32)
        >>> compute_dtype_name((bf16, bf16), (f32,)), compute_dtype_name((i32,), (f32,))
        ('bfloat16', 'float32')
    """
    inputs = [_dtype_name(a) for a in avals_in]
    floating = [name for name in inputs if name.startswith(("float", "bfloat"))]
    if floating:
        return floating[0]
    outputs = [name for name in map(_dtype_name, avals_out) if name]
    return outputs[0] if outputs else "float32"


def _dtype_name(aval) -> str:
    dtype = getattr(aval, "dtype", None)
    return "" if dtype is None else str(dtype)


def estimate_op_cost(primitive, params: dict, avals_in, avals_out) -> OpCost:
    """The cost of one equation (the fallback when no rule is registered)."""
    rule = _rule_for(primitive)
    if rule is None:
        return OpCost(hbm_bytes=nbytes(*avals_in, *avals_out))
    ctx = RuleContext(primitive=primitive, avals_in=tuple(avals_in), avals_out=tuple(avals_out))
    return rule(ctx, **params)


class OpClass(enum.Flag):
    """Operator classes of a primitive; one primitive may have several (a gather moves data
    and is a kernel of its own; a reduce_sum is a reduction and a kernel)."""

    # Results of the operands' shape, element i of each read from element i of each operand.
    ELEMENTWISE = enum.auto()
    # Each result element is an operand element (or filler): broadcasts, slices, gathers, ...
    DATA_MOVEMENT = enum.auto()
    # Layout operators (and our markers) XLA fuses into the loop of the operator they feed.
    FUSED_LAYOUT = enum.auto()
    # Operators that stay kernels of their own after XLA's fusion (one launch latency each).
    KERNEL = enum.auto()
    # Reductions along dims (sums, maxima, arg-maxima, cumulative ops, sorts).
    REDUCTION = enum.auto()
    # Matrix products (dot_general, convolutions): the tensor cores' work on a GPU.
    MATMUL = enum.auto()


_NO_CLASS = OpClass(0)
_OPERATOR_CLASSES: dict[object, OpClass] = {}


def register_operator_class(cls: OpClass, *primitives) -> None:
    """Adds ``cls`` to the classes of each of ``primitives`` (objects, not names)."""
    for primitive in primitives:
        _OPERATOR_CLASSES[primitive] = _OPERATOR_CLASSES.get(primitive, _NO_CLASS) | cls


def operator_class(primitive) -> OpClass:
    """The classes of ``primitive`` (``OpClass(0)``, falsy, when it has none).

    ELEMENTWISE is also derived for a primitive registered without it that jax itself batches
    as elementwise (`batched_elementwise`), except PRNG key primitives (``random_bits`` and its
    kin change shapes; they are replicated on purpose): a primitive a new jax release adds
    (``one_minus_square`` in 0.12) is elementwise here without an entry.
    """
    classes = _OPERATOR_CLASSES.get(primitive, _NO_CLASS)
    if OpClass.ELEMENTWISE not in classes and not primitive.name.startswith("random_") \
            and batched_elementwise(primitive):
        classes |= OpClass.ELEMENTWISE
    return classes


def primitives_of(cls: OpClass) -> tuple:
    """The primitives registered with class ``cls`` (in registration order; none derived)."""
    return tuple(p for p, classes in _OPERATOR_CLASSES.items() if cls in classes)


def is_elementwise(primitive) -> bool:
    """Is ``primitive`` elementwise: results of the operands' shape, element i of each result
    read from element i of each operand (lax broadcasts scalars and size-1 dims)?

    Example:
        >>> from jax.extend.core import primitives as prims
        >>> is_elementwise(prims.tanh_p), is_elementwise(prims.dot_general_p)
        (True, False)
    """
    return OpClass.ELEMENTWISE in operator_class(primitive)


def is_fused(primitive) -> bool:
    """Elementwise operators, broadcasts, reshapes, iotas and our markers: XLA fuses them."""
    return bool(operator_class(primitive) & (OpClass.FUSED_LAYOUT | OpClass.ELEMENTWISE))
