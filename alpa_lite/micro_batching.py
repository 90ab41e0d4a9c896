"""How the values of a micro-batched step combine into the values serial `jax.jit` returns.

Input: the step's `OpGraph` traced at micro-batch size and the same step traced at full batch
size (equation for equation the same program, only batch-sized shapes and batch-size literals
differ). Output: `MicroBatchPlan`: for every value crossing `alpa_lite.value_and_grad`'s
boundary, the `Combine` rule that reproduces the full-batch value from the k micro-batch
values, and the random draws whose shape contains the batch (each micro-batch must draw its
own rows of the full-batch stream).

The analysis runs over both graphs in lockstep with one abstract value per variable
(`alpa_lite.batch_rules.Val`: constant, per-example, a scaled sum over examples, a maximum or
minimum over examples, or opaque), whose per-primitive rules live in `alpa_lite.batch_rules`.
Per-example values carry their scale's change from micro-batch to full batch, so gradients
are classified directly: a mean loss seeds its backward pass with 1 / batch_size, and the
gradient comes out a sum scaled by 1/k from micro-batch to full batch, i.e. a mean.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from alpa_lite._jax_compat import tile_primitive
from alpa_lite.batch_rules import (REDUCTION_KINDS, Kind, RuleContext, Val, apply_batch_rule,
                                   index_operands, is_identity, opaque, per_example, scale_of)
from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import OpGraph
from alpa_lite.loop_regions import loop_enter_p, loop_exit_p
from alpa_lite.markers import grad_boundary_p, layer_boundary_p, manual_boundary_p


class Combine(enum.Enum):
    """How k micro-batch values of one output make the full-batch value."""

    SUM = "sum"        # sum of the micro-batch values (sums, counts)
    MEAN = "mean"      # their average (means over the batch, and their gradients)
    MAX = "max"
    MIN = "min"
    SAME = "same"      # batch-independent: every micro-batch computes the same value
    CONCAT = "concat"  # per-example values: interleave micro-batch rows back into batch order


@dataclasses.dataclass(frozen=True)
class Rule:
    """A `Combine` with, for CONCAT, the batch dim and how many elements each example has."""

    combine: Combine
    dim: int = -1
    group: int = 1


@dataclasses.dataclass(frozen=True)
class MicroBatchPlan:
    """What emission needs to reproduce serial results under micro-batching.

    Attributes:
        num_micro_batches: k.
        rules: boundary operand value id (micro graph) -> its `Rule`.
        random_dims: micro-graph node index of a ``random_bits`` whose shape holds the batch
            -> the batch dim of its result.
    """

    num_micro_batches: int
    rules: dict[int, Rule]
    random_dims: dict[int, int]


_OPAQUE = Val(Kind.OPAQUE)
_MARKERS = (layer_boundary_p, manual_boundary_p)


def build_micro_batch_plan(micro: OpGraph, full: OpGraph, num_micro_batches: int,
                           batch_inputs: list[bool]) -> MicroBatchPlan:
    """Classifies every value crossing the gradient boundary (see the module docstring).

    Args:
        micro: the step traced at micro-batch size.
        full: the same step traced at full batch size.
        num_micro_batches: k.
        batch_inputs: per graph input, whether it is split into micro-batches.

    Raises:
        InvalidConfigError: the traces differ in structure, or a value returned from the
            differentiated function (or the loss of a gradient) combines in no exact way.
    """
    # Layer markers exist only where layers were constructed: match the other operators.
    micro_ops = [n for n in micro.nodes if n.primitive not in _MARKERS]
    full_ops = [n for n in full.nodes if n.primitive not in _MARKERS]
    if ([n.primitive for n in micro_ops] != [n.primitive for n in full_ops]
            or len(micro.inputs) != len(full.inputs)):
        raise InvalidConfigError(
            "The step traces to different programs at micro-batch size and at full batch size "
            "(Python control flow that depends on the batch size?). Make the step's structure "
            "independent of the batch size, or set num_micro_batches=None.")
    analysis = _Analysis(micro, full, num_micro_batches)
    for v, is_batch in zip(micro.inputs, batch_inputs):
        analysis.values[v] = Val(Kind.BATCH, dim=0) if is_batch else Val(Kind.CONST)
    for (v, value), (_, full_value) in zip(micro.consts, full.consts):
        same = np.shape(value) == np.shape(full_value) and np.array_equal(value, full_value)
        analysis.values[v] = Val(Kind.CONST) if same else Val(Kind.OPAQUE, origin=(
            None, "a constant array of the step that differs between the micro-batch and the "
                  "full-batch trace"))
    full_of = {n.index: f for n, f in zip(micro_ops, full_ops)}
    i = 0
    while i < len(micro.nodes):
        node = micro.nodes[i]
        if node.primitive in _MARKERS:
            analysis.values.update(zip(node.outvars, (analysis.operand(v, v)
                                                      for v in node.invars)))
        else:
            analysis.visit(node, full_of[node.index])
        # A carry that became a sum (a gradient accumulated over time steps) re-runs its loop.
        i, analysis.rerun_from = (analysis.rerun_from, None) if analysis.rerun_from is not None \
            else (i + 1, None)
    boundaries = [n for n in micro.nodes if n.primitive is grad_boundary_p]
    rules = {}
    for boundary in boundaries:
        rules.update(_boundary_rules(boundary, analysis, num_micro_batches))
    return MicroBatchPlan(num_micro_batches, rules, analysis.random_dims)


def _boundary_rules(boundary, analysis: "_Analysis", k: int) -> dict[int, Rule]:
    roles = boundary.params.get("roles") or ("aux",) * len(boundary.invars)
    names = boundary.params.get("names") or tuple(f"output {i}" for i in range(len(roles)))
    rules: dict[int, Rule] = {}
    loss_rule = None
    for v, role, name in zip(boundary.invars, roles, names):
        if role == "loss" and isinstance(v, int):
            loss_rule = _value_rule(analysis.values[v], k)
            if loss_rule is None or loss_rule.combine not in (Combine.SUM, Combine.MEAN,
                                                                Combine.SAME):
                raise InvalidConfigError(
                    f"With micro-batches, {name} must be a sum or a mean over the batch "
                    f"({_describe(analysis.values[v])}), so that its gradients can be "
                    "accumulated exactly. Return a per-batch mean (e.g. jnp.mean of per-example "
                    "losses), or set num_micro_batches=None.")
    for v, role, name in zip(boundary.invars, roles, names):
        if not isinstance(v, int):
            continue
        value = analysis.values[v]
        direct = _value_rule(value, k)
        if role == "grad" and direct is not None and direct.combine in (
                Combine.SUM, Combine.MEAN, Combine.SAME):
            rules[v] = direct
            continue
        if role == "grad":
            if value.kind is Kind.BATCH or loss_rule is None:
                raise InvalidConfigError(
                    f"With micro-batches, the gradient {name} cannot be accumulated exactly "
                    f"({_describe(value)}). Differentiate with respect to parameters, not the "
                    "batch, or set num_micro_batches=None.")
            else:
                rules[v] = Rule(Combine.MEAN if loss_rule.combine is Combine.MEAN
                                else Combine.SUM)
            continue
        rule = direct
        if rule is None:
            raise InvalidConfigError(
                f"With micro-batches, {name} cannot be rebuilt exactly from micro-batch values "
                f"({_describe(value)}). Return "
                "sums, means, maxima, minima or per-example values (e.g. a masked mean as its "
                "numerator and denominator, divided after the step), or set "
                "num_micro_batches=None.")
        rules[v] = rule
    return rules


def _value_rule(value: Val, k: int) -> Rule | None:
    if value.kind is Kind.CONST:
        return Rule(Combine.SAME)
    if value.kind is Kind.BATCH:
        if not (value.zero or math.isclose(value.ratio, 1.0, rel_tol=1e-6)):
            return None
        return Rule(Combine.CONCAT, value.dim, max(value.group, 1))
    if value.kind is Kind.MAX:
        return Rule(Combine.MAX)
    if value.kind is Kind.MIN:
        return Rule(Combine.MIN)
    if value.kind is Kind.SUM:
        if math.isclose(value.ratio, 1.0 / k, rel_tol=1e-6):
            return Rule(Combine.MEAN)
        if math.isclose(value.ratio, 1.0, rel_tol=1e-6) and not value.affine:
            return Rule(Combine.SUM)
    return None


def _describe(value: Val) -> str:
    if value.kind is Kind.SUM:
        offset = " plus a constant" if value.affine else ""
        return (f"it is a scaled sum over the batch{offset} whose scale changes by "
                f"{value.ratio:g}x from micro-batch to full batch, neither a sum nor a mean")
    if value.kind is Kind.BATCH:
        return (f"it is per-example, scaled by a factor that changes {value.ratio:g}x from "
                "micro-batch to full batch")
    if value.kind is Kind.OPAQUE and value.origin is not None:
        node, reason = value.origin
        if node is None:
            return reason
        where = f" at {node.source_line}" if node.source_line else ""
        return (f"its dependence on the batch could not be followed through "
                f"`{node.primitive.name}`{where}: {reason}")
    return ("it depends on the whole batch in a way that is not a sum, mean, max or min, "
            "e.g. a ratio of sums or statistics of the batch fed back into the examples")


class _Analysis:
    """Abstract interpretation of the micro graph, reading shapes and literals of the full one."""

    def __init__(self, micro: OpGraph, full: OpGraph, k: int):
        self.micro, self.full, self.k = micro, full, k
        self.values: dict[int, Val] = {}
        self.random_dims: dict[int, int] = {}
        # A scan's carry-exit node -> the value its carry entered the body as.
        self.carry_in = {exit_: micro.nodes[enter].outvars[0] for loop in micro.loops
                         if not loop.branches
                         for enter, exit_ in zip(loop.carry_enter, loop.carry_exit)}
        self.enter_of = {exit_: (enter, loop.first) for loop in micro.loops if not loop.branches
                         for enter, exit_ in zip(loop.carry_enter, loop.carry_exit)}
        self.carry_joins: dict[int, Val] = {}   # carry-enter node -> its value in every trip
        self.rerun_from: int | None = None      # node to go back to (a loop's first)

    def operand(self, v, full_v) -> Val:
        if isinstance(v, int):
            return self.values[v]
        micro_val, full_val = np.asarray(v.val), np.asarray(full_v.val)
        same = micro_val.shape == full_val.shape and np.array_equal(micro_val, full_val)
        num = ((float(micro_val.flat[0]), float(full_val.flat[0]))
               if micro_val.size == 1 and full_val.size == 1
               and np.issubdtype(micro_val.dtype, np.number) else None)
        return Val(Kind.CONST, invariant=same, num=num)

    def batch_dim(self, v: int, full_v: int) -> int | None:
        """The single dim whose full size is k times its micro size (None: none, or several)."""
        micro_shape = tuple(self.micro.avals[v].shape)
        full_shape = tuple(self.full.avals[full_v].shape)
        if len(micro_shape) != len(full_shape):
            return -2
        dims = [d for d, (a, b) in enumerate(zip(micro_shape, full_shape)) if a != b]
        if not dims:
            return None
        if len(dims) == 1 and full_shape[dims[0]] == self.k * micro_shape[dims[0]]:
            return dims[0]
        return -2

    def visit(self, node, full_node) -> None:
        ins = [self.operand(v, fv) for v, fv in zip(node.invars, full_node.invars)]
        if node.primitive is loop_exit_p and node.params["kind"] == "join":
            # A cond's result: the same kind in every branch, chosen by a batch-free index.
            index, outs = ins[0], ins[1:]
            same = all(x == outs[0] for x in outs) or all(x.kind is Kind.CONST for x in outs)
            result = outs[0] if all(x == outs[0] for x in outs) else Val(
                Kind.CONST, invariant=all(x.invariant for x in outs))
            self.values[node.outvars[0]] = result if same and index.kind is Kind.CONST \
                else opaque(node, "a cond whose branches treat the batch differently")
            return
        if node.primitive in (loop_enter_p, loop_exit_p):
            self.values[node.outvars[0]] = self.loop_border(node, ins[0])
            return
        if is_identity(node.primitive) and len(node.invars) == len(node.outvars):
            self.values.update(zip(node.outvars, ins))
            return
        outs = [self.batch_dim(v, fv) for v, fv in zip(node.outvars, full_node.outvars)]
        lost = next((x for x in ins if x.kind is Kind.OPAQUE), None)
        if all(x.kind is Kind.CONST for x in ins):
            results = [self.const_result(node, full_node, ins, d) for d in outs]
        elif lost is not None:
            results = [lost] * len(node.outvars)  # keeps where batch dependence was lost
        else:
            results = self.mixed_result(node, ins, outs)
        self.values.update(zip(node.outvars, results))

    def loop_border(self, node, x: Val) -> Val:
        """A scan's border: slices/stacks move the batch dim; a carry must keep its kind.

        The body was analysed with each carry as it entered; the carry leaving an iteration
        must be of the same kind, else the loop's result is OPAQUE (conservative), except for
        an accumulator (zeros in, a sum or per-example value out), whose body is analysed
        again with the carry as it leaves.
        """
        kind = node.params["kind"]
        if kind in ("slice", "stack") and x.kind is Kind.BATCH:
            dim = x.dim + (1 if kind == "stack" else -1)
            return opaque(node, "a loop over the batch dim") if dim < 0 else \
                dataclasses.replace(x, dim=dim)
        if node.primitive is loop_enter_p and kind == "carry" and node.index in self.carry_joins:
            return self.carry_joins[node.index]
        if node.primitive is loop_exit_p and kind == "carry":
            entered = self.values[self.carry_in[node.index]]
            if x.kind is Kind.CONST and entered.kind is Kind.CONST:
                return Val(Kind.CONST, invariant=x.invariant and entered.invariant)
            if x == entered:
                return x
            enter, first = self.enter_of[node.index]
            if _starts_at_zero(entered, x) and enter not in self.carry_joins:
                self.carry_joins[enter] = x  # analyse the body again with the carry as x
                self.rerun_from = first
                return x
            return opaque(node, "a loop carry whose dependence on the batch changes between "
                                "iterations")
        return x

    def const_result(self, node, full_node, ins: list[Val], out_dim) -> Val:
        if out_dim is None:
            invariant = all(x.invariant for x in ins) and _same_params(node, full_node)
            return Val(Kind.CONST, invariant=invariant, num=_fold(node, ins))
        if out_dim < 0:
            return opaque(node, "a result whose shape changes with the batch size in more "
                                "than one dim")
        # A batch-shaped value made from constants: rows are alike unless made along the
        # batch, each row the constant (a cotangent seeded with 1 / batch_size, say).
        if node.primitive is prims.random_bits_p:
            self.random_dims[node.index] = out_dim
            return Val(Kind.BATCH, dim=out_dim)
        if self.copies_rows(node, out_dim):
            row = per_example(out_dim, 0, scale_of(ins[0]))
            return row if row is not None else opaque(
                node, "a constant copied along the batch whose value changes with the batch "
                      "size in no proportional way")
        if node.primitive is prims.iota_p and node.params["dimension"] != out_dim:
            return Val(Kind.BATCH, dim=out_dim, group=0)
        return opaque(node, "a batch-sized value made along the batch dim from constants")

    def copies_rows(self, node, out_dim: int) -> bool:
        """Does a broadcast or tile of a constant make every row along ``out_dim`` a copy
        (a cotangent seeded with 1 / batch_size, a parameter tiled to the batch)?"""
        operand = node.invars[0] if node.invars else None
        shape = self.micro.avals[operand].shape if isinstance(operand, int) else \
            np.shape(getattr(operand, "val", ()))
        if node.primitive is prims.broadcast_in_dim_p:
            dims = node.params["broadcast_dimensions"]
            return out_dim not in dims or shape[dims.index(out_dim)] == 1
        return node.primitive is tile_primitive() and shape[out_dim] == 1

    def mixed_result(self, node, ins: list[Val], out_dims: list) -> list[Val]:
        kinds = {x.kind for x in ins} - {Kind.CONST}
        if Kind.BATCH in kinds:
            if len(kinds) > 1:
                return [opaque(node, "a value reduced over the batch mixed back into "
                                     "per-example values (batch statistics, e.g. BatchNorm "
                                     "in training mode)")] * len(node.outvars)
            ctx = RuleContext(node=node, ins=ins, out_dims=out_dims,
                              avals_in=[self.micro.avals[v] if isinstance(v, int) else v.aval
                                        for v in node.invars],
                              avals_out=[self.micro.avals[v] for v in node.outvars])
            return apply_batch_rule(ctx)
        if any(d is not None for d in out_dims):
            return [opaque(node, "a batch-sized result of values reduced over the batch")] * \
                len(node.outvars)
        moved = _moved_reduction(node, ins)
        if moved is not None:
            return [moved] * len(node.outvars)
        if len(node.outvars) != 1:
            return [opaque(node, f"`{node.primitive.name}` of values reduced over the batch")] * \
                len(node.outvars)
        result = _reduced_result(node, ins, self.micro)
        if result.kind is Kind.OPAQUE:
            return [opaque(node, "an operation on values reduced over the batch that no "
                                 "combination of micro-batch results reproduces (e.g. a "
                                 "ratio of two sums, or a sum rescaled by a batch-size "
                                 "dependent number other than 1/batch_size)")]
        return [result]


def _starts_at_zero(entered: Val, left: Val) -> bool:
    """A carry that enters the loop as zeros and leaves as a sum or per-example value (an
    accumulator): every trip sees that kind, so the body is analysed again with it."""
    if left.kind is Kind.SUM:
        return entered.kind is Kind.CONST and entered.num == (0.0, 0.0)
    if left.kind is Kind.BATCH:
        return entered.kind is Kind.BATCH and entered.zero and entered.dim == left.dim
    return False


def _same_params(node, full_node) -> bool:
    for key, value in node.params.items():
        other = full_node.params.get(key)
        if isinstance(value, (jcore.ClosedJaxpr, jcore.Jaxpr)):
            continue
        try:
            if value != other:
                return False
        except ValueError:  # arrays compare elementwise
            return False
    return True


def _fold(node, ins: list[Val]) -> tuple | None:
    """(micro, full) value of a scalar-valued constant op, when every operand has one."""
    nums = [x.num for x in ins]
    if any(n is None for n in nums):
        return None
    prim = node.primitive
    if prim in (prims.convert_element_type_p, prims.broadcast_in_dim_p, prims.reshape_p,
                prims.squeeze_p, prims.copy_p) and len(nums) == 1:
        return nums[0]
    ops = {prims.mul_p: lambda a, b: a * b, prims.add_p: lambda a, b: a + b,
           prims.sub_p: lambda a, b: a - b,
           prims.div_p: lambda a, b: a / b if b else math.nan}
    if prim in ops and len(nums) == 2:
        return tuple(ops[prim](a, b) for a, b in zip(*nums))
    if prim is prims.neg_p:
        return tuple(-a for a in nums[0])
    return None


def _moved_reduction(node, ins: list[Val]) -> Val | None:
    """The value of data movement (`batch_rules.register_data_movement`) applied to one kind
    of reduction (and constants), or None: filler constants must be zero for a sum (so k
    micro-batch copies add up to one) and equal in both traces for a maximum or minimum; index
    operands must be invariant."""
    indices = index_operands(node.primitive, len(ins))
    if indices is None:
        return None
    data = [x for i, x in enumerate(ins) if i not in indices]
    reduced = [x for x in data if x.kind is not Kind.CONST]
    kinds = {x.kind for x in reduced}
    if len(kinds) != 1 or not all(ins[i].kind is Kind.CONST and ins[i].invariant
                                  for i in indices):
        return None
    first = reduced[0]
    if first.kind is Kind.SUM:
        if any(not math.isclose(x.ratio, first.ratio, rel_tol=1e-6) for x in reduced) or \
                any(x.num != (0.0, 0.0) for x in data if x.kind is Kind.CONST):
            return None
        return dataclasses.replace(first, affine=any(x.affine for x in reduced))
    if first.kind in (Kind.MAX, Kind.MIN):
        return first if all(x.invariant for x in data if x.kind is Kind.CONST) else None
    return None


def _reduced_result(node, ins: list[Val], graph: OpGraph) -> Val:
    """An op on batch reductions (SUM / MAX / MIN) and constants."""
    prim = node.primitive
    out_dtype = np.dtype(graph.avals[node.outvars[0]].dtype)
    reduced = [x for x in ins if x.kind is not Kind.CONST]
    kinds = {x.kind for x in reduced}
    if len(kinds) != 1:
        return _OPAQUE
    kind = kinds.pop()
    if prim is prims.convert_element_type_p:  # (shape-only ops: `_moved_reduction`)
        in_dtype = np.dtype(graph.avals[node.invars[0]].dtype)
        rounds = np.issubdtype(in_dtype, np.inexact) and not np.issubdtype(out_dtype, np.inexact)
        return _OPAQUE if rounds and kind is Kind.SUM else reduced[0]
    if kind is Kind.SUM:
        return _sum_result(node, ins, integer=not np.issubdtype(out_dtype, np.inexact))
    if prim is prims.neg_p:
        return Val(Kind.MIN if kind is Kind.MAX else Kind.MAX)
    if prim in (prims.add_p, prims.sub_p) and len(reduced) == 1 and (
            prim is prims.add_p or ins[0].kind is kind):
        const = next(x for x in ins if x.kind is Kind.CONST)
        return reduced[0] if const.invariant else _OPAQUE
    if (prim is prims.max_p and kind is Kind.MAX) or (prim is prims.min_p and kind is Kind.MIN):
        return reduced[0] if all(x.invariant for x in ins if x.kind is Kind.CONST) else _OPAQUE
    if REDUCTION_KINDS.get(prim) is kind:
        return reduced[0]
    return _OPAQUE


def _sum_result(node, ins: list[Val], *, integer: bool) -> Val:
    """Linear ops keep a scaled sum a scaled sum; the scale's change is tracked in ``ratio``."""
    prim = node.primitive
    sums = [x for x in ins if x.kind is Kind.SUM]
    consts = [x for x in ins if x.kind is Kind.CONST]
    if prim is prims.neg_p or prim is prims.reduce_sum_p:
        return sums[0]
    if prim in (prims.add_p, prims.sub_p, prims.add_jaxvals_p):
        if len(sums) == 2:
            a, b = sums
            same = math.isclose(a.ratio, b.ratio, rel_tol=1e-6)
            return dataclasses.replace(a, affine=a.affine or b.affine) if same else _OPAQUE
        return dataclasses.replace(sums[0], affine=True) if consts[0].invariant else _OPAQUE
    if prim is prims.mul_p and len(sums) == 1:
        return _scaled(sums[0], consts[0], invert=False)
    if prim is prims.div_p and ins[0].kind is Kind.SUM and ins[1].kind is Kind.CONST:
        if integer:
            return _OPAQUE  # integer division rounds
        return _scaled(sums[0], consts[0], invert=True)
    if prim is prims.dot_general_p and len(sums) == 1 and consts[0].invariant:
        return sums[0]
    return _OPAQUE


def _scaled(value: Val, const: Val, *, invert: bool) -> Val:
    if const.num is not None:
        micro, full = const.num
        if micro == 0 or full == 0 or not (math.isfinite(micro) and math.isfinite(full)):
            return _OPAQUE
        change = micro / full if invert else full / micro
        return dataclasses.replace(value, ratio=value.ratio * change)
    return value if const.invariant else _OPAQUE
