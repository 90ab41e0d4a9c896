"""How the values of a micro-batched step combine into the values serial `jax.jit` returns.

Input: the step's `OpGraph` traced at micro-batch size and the same step traced at full batch
size (equation for equation the same program, only batch-sized shapes and batch-size literals
differ). Output: `MicroBatchPlan`: for every value crossing `alpa_lite.value_and_grad`'s
boundary, the `Combine` rule that reproduces the full-batch value from the k micro-batch
values, and the random draws whose shape contains the batch (each micro-batch must draw its
own rows of the full-batch stream).

The analysis runs over both graphs in lockstep with one abstract value per variable:

* ``CONST``: independent of the batch; scalar constants keep their value in both traces, so a
  divisor that is the batch size (``jnp.mean``) is told apart from a fixed number.
* ``BATCH``: per-example: along one dim (the only dim whose full size is k times its micro
  size) each group of ``group`` consecutive elements depends on one example only.
* ``SUM``: ``c * sum over examples`` (+ a batch-independent offset when ``affine``); ``ratio``
  is the full-batch ``c`` over the micro-batch ``c``: 1 for a sum, 1/k for a mean.
* ``MAX`` / ``MIN``: a maximum / minimum over examples.
* ``OPAQUE``: depends on the batch in any other way (a ratio of sums, BatchNorm statistics
  feeding back into examples, a slice of the batch, ...): no exact combination is known.

Gradients combine like the loss they differentiate (differentiation is linear), so only the
loss and the aux values are classified; the loss must be a sum or a mean.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from alpa_lite._jax_compat import optimization_barrier_primitive
from alpa_lite.cost.rules import is_elementwise
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


class _Kind(enum.Enum):
    CONST = 0
    BATCH = 1
    SUM = 2
    MAX = 3
    MIN = 4
    OPAQUE = 5


@dataclasses.dataclass(frozen=True)
class _Val:
    kind: _Kind
    dim: int = -1               # BATCH: batch dim
    group: int = 1              # BATCH: consecutive elements per example along dim
    ratio: float = 1.0          # SUM: full-batch scale / micro-batch scale
    affine: bool = False        # SUM: has a batch-independent offset
    invariant: bool = True      # CONST: equal in both traces
    num: tuple | None = None    # CONST: (micro, full) value when every element is one number


_OPAQUE = _Val(_Kind.OPAQUE)
_IDENTITY = {prims.copy_p, prims.stop_gradient_p, prims.reduce_precision_p, layer_boundary_p,
             manual_boundary_p, grad_boundary_p}
_SHAPE_ONLY = {prims.reshape_p, prims.squeeze_p, prims.broadcast_in_dim_p, prims.transpose_p}
_REDUCTIONS = {prims.reduce_sum_p: _Kind.SUM, prims.reduce_max_p: _Kind.MAX,
               prims.reduce_min_p: _Kind.MIN, prims.reduce_or_p: _Kind.MAX,
               prims.reduce_and_p: _Kind.MIN}
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
        analysis.values[v] = _Val(_Kind.BATCH, dim=0) if is_batch else _Val(_Kind.CONST)
    for (v, value), (_, full_value) in zip(micro.consts, full.consts):
        same = np.shape(value) == np.shape(full_value) and np.array_equal(value, full_value)
        analysis.values[v] = _Val(_Kind.CONST) if same else _OPAQUE
    full_of = {n.index: f for n, f in zip(micro_ops, full_ops)}
    for node in micro.nodes:
        if node.primitive in _MARKERS:
            analysis.values.update(zip(node.outvars, (analysis.operand(v, v)
                                                      for v in node.invars)))
        else:
            analysis.visit(node, full_of[node.index])
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
        if role == "grad":
            if value.kind is _Kind.CONST:
                rules[v] = Rule(Combine.SAME)
            elif value.kind is _Kind.BATCH or loss_rule is None:
                raise InvalidConfigError(
                    f"With micro-batches, the gradient {name} cannot be accumulated exactly "
                    f"({_describe(value)}). Differentiate with respect to parameters, not the "
                    "batch, or set num_micro_batches=None.")
            else:
                rules[v] = Rule(Combine.MEAN if loss_rule.combine is Combine.MEAN
                                else Combine.SUM)
            continue
        rule = _value_rule(value, k)
        if rule is None:
            raise InvalidConfigError(
                f"With micro-batches, the value {name} returned from alpa_lite.value_and_grad "
                f"cannot be rebuilt exactly from micro-batch values ({_describe(value)}). Return "
                "sums, means, maxima, minima or per-example values (e.g. a masked mean as its "
                "numerator and denominator, divided after the step), or set "
                "num_micro_batches=None.")
        rules[v] = rule
    return rules


def _value_rule(value: _Val, k: int) -> Rule | None:
    if value.kind is _Kind.CONST:
        return Rule(Combine.SAME)
    if value.kind is _Kind.BATCH:
        return Rule(Combine.CONCAT, value.dim, value.group)
    if value.kind is _Kind.MAX:
        return Rule(Combine.MAX)
    if value.kind is _Kind.MIN:
        return Rule(Combine.MIN)
    if value.kind is _Kind.SUM:
        if math.isclose(value.ratio, 1.0 / k, rel_tol=1e-6):
            return Rule(Combine.MEAN)
        if math.isclose(value.ratio, 1.0, rel_tol=1e-6) and not value.affine:
            return Rule(Combine.SUM)
    return None


def _describe(value: _Val) -> str:
    if value.kind is _Kind.SUM:
        offset = " plus a constant" if value.affine else ""
        return (f"it is a scaled sum over the batch{offset} whose scale changes by "
                f"{value.ratio:g}x from micro-batch to full batch, neither a sum nor a mean")
    if value.kind is _Kind.BATCH:
        return "it is per-example"
    return ("it depends on the whole batch in a way that is not a sum, mean, max or min, "
            "e.g. a ratio of sums or statistics of the batch fed back into the examples")


class _Analysis:
    """Abstract interpretation of the micro graph, reading shapes and literals of the full one."""

    def __init__(self, micro: OpGraph, full: OpGraph, k: int):
        self.micro, self.full, self.k = micro, full, k
        self.values: dict[int, _Val] = {}
        self.random_dims: dict[int, int] = {}
        # A scan's carry-exit node -> the value its carry entered the body as.
        self.carry_in = {exit_: micro.nodes[enter].outvars[0] for loop in micro.loops
                         if not loop.branches
                         for enter, exit_ in zip(loop.carry_enter, loop.carry_exit)}

    def operand(self, v, full_v) -> _Val:
        if isinstance(v, int):
            return self.values[v]
        micro_val, full_val = np.asarray(v.val), np.asarray(full_v.val)
        same = micro_val.shape == full_val.shape and np.array_equal(micro_val, full_val)
        num = ((float(micro_val.flat[0]), float(full_val.flat[0]))
               if micro_val.size == 1 and full_val.size == 1
               and np.issubdtype(micro_val.dtype, np.number) else None)
        return _Val(_Kind.CONST, invariant=same, num=num)

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
            same = all(x == outs[0] for x in outs) or all(x.kind is _Kind.CONST for x in outs)
            result = outs[0] if all(x == outs[0] for x in outs) else _Val(
                _Kind.CONST, invariant=all(x.invariant for x in outs))
            self.values[node.outvars[0]] = result if same and index.kind is _Kind.CONST \
                else _OPAQUE
            return
        if node.primitive in (loop_enter_p, loop_exit_p):
            self.values[node.outvars[0]] = self.loop_border(node, ins[0])
            return
        identity = node.primitive in _IDENTITY or \
            node.primitive is optimization_barrier_primitive()  # remat's barrier
        if identity and len(node.invars) == len(node.outvars):
            self.values.update(zip(node.outvars, ins))
            return
        outs = [self.batch_dim(v, fv) for v, fv in zip(node.outvars, full_node.outvars)]
        if all(x.kind is _Kind.CONST for x in ins):
            results = [self.const_result(node, full_node, ins, d) for d in outs]
        elif any(x.kind is _Kind.OPAQUE for x in ins) or len(node.outvars) != 1:
            results = [_OPAQUE] * len(node.outvars)
        else:
            results = [self.mixed_result(node, ins, outs[0])]
        self.values.update(zip(node.outvars, results))

    def loop_border(self, node, x: _Val) -> _Val:
        """A scan's border: slices/stacks move the batch dim; a carry must keep its kind.

        The body was analysed once, with each carry as it entered; the carry leaving an
        iteration must be of the same kind, else the loop's result is OPAQUE (conservative).
        """
        kind = node.params["kind"]
        if kind in ("slice", "stack") and x.kind is _Kind.BATCH:
            dim = x.dim + (1 if kind == "stack" else -1)
            return _OPAQUE if dim < 0 else dataclasses.replace(x, dim=dim)
        if node.primitive is loop_exit_p and kind == "carry":
            entered = self.values[self.carry_in[node.index]]
            if x.kind is _Kind.CONST and entered.kind is _Kind.CONST:
                return _Val(_Kind.CONST, invariant=x.invariant and entered.invariant)
            return x if x == entered else _OPAQUE
        return x

    def const_result(self, node, full_node, ins: list[_Val], out_dim) -> _Val:
        if out_dim is None:
            invariant = all(x.invariant for x in ins) and _same_params(node, full_node)
            return _Val(_Kind.CONST, invariant=invariant, num=_fold(node, ins))
        if out_dim < 0:
            return _OPAQUE
        # A batch-shaped value made from constants: rows are alike unless made along the batch.
        if node.primitive is prims.random_bits_p:
            self.random_dims[node.index] = out_dim
            return _Val(_Kind.BATCH, dim=out_dim)
        if node.primitive is prims.broadcast_in_dim_p:
            dims = node.params["broadcast_dimensions"]
            operand_shape = np.shape(node.invars[0].val) if not isinstance(
                node.invars[0], int) else self.micro.avals[node.invars[0]].shape
            if out_dim not in dims or operand_shape[dims.index(out_dim)] == 1:
                return _Val(_Kind.BATCH, dim=out_dim)  # broadcast along the batch: rows alike
        if node.primitive is prims.iota_p and node.params["dimension"] != out_dim:
            return _Val(_Kind.BATCH, dim=out_dim)
        return _OPAQUE

    def mixed_result(self, node, ins: list[_Val], out_dim) -> _Val:
        kinds = {x.kind for x in ins} - {_Kind.CONST}
        if _Kind.BATCH in kinds:
            if len(kinds) > 1:
                return _OPAQUE  # batch statistics mixed back into examples (e.g. BatchNorm)
            return self.batch_result(node, ins, out_dim)
        if out_dim is not None:
            return _OPAQUE
        return _reduced_result(node, ins, self.micro)

    def batch_result(self, node, ins: list[_Val], out_dim) -> _Val:
        prim = node.primitive
        batch_ins = [(x, v) for x, v in zip(ins, node.invars) if x.kind is _Kind.BATCH]
        if out_dim is None:  # the batch dim was reduced away
            return _batch_reduction(node, ins)
        if out_dim < 0:
            return _OPAQUE
        first, first_v = batch_ins[0]
        if is_elementwise(prim):
            same = all(x.dim == first.dim and x.group == first.group for x, _ in batch_ins)
            return _Val(_Kind.BATCH, dim=out_dim, group=first.group) if same else _OPAQUE
        if prim is prims.broadcast_in_dim_p and len(batch_ins) == 1:
            moved = node.params["broadcast_dimensions"][first.dim] == out_dim
            return _Val(_Kind.BATCH, dim=out_dim, group=first.group) if moved else _OPAQUE
        if prim is prims.transpose_p:
            moved = node.params["permutation"].index(first.dim) == out_dim
            return _Val(_Kind.BATCH, dim=out_dim, group=first.group) if moved else _OPAQUE
        if len(batch_ins) == 1 and prim in _SHAPE_ONLY:
            group = _reshaped_group(self.micro.avals[first_v].shape,
                                    self.micro.avals[node.outvars[0]].shape, first, out_dim)
            return _OPAQUE if group is None else _Val(_Kind.BATCH, dim=out_dim, group=group)
        if _keeps_batch_dim(node, ins, self.micro):
            return _Val(_Kind.BATCH, dim=out_dim, group=first.group)
        return _OPAQUE


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


def _fold(node, ins: list[_Val]) -> tuple | None:
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


def _reshaped_group(in_shape, out_shape, value: _Val, out_dim: int) -> int | None:
    """Group size after a shape-only op, or None when examples no longer stay apart.

    Examples keep their elements together when the batch dim stays the major part of the
    dims it is merged with (``(b, s) -> (b * s)``, not ``(s, b) -> (s * b)``).
    """
    d, g = value.dim, value.group
    if math.prod(in_shape[:d]) != math.prod(out_shape[:out_dim]):
        return None
    minor_in, minor_out = math.prod(in_shape[d + 1:]), math.prod(out_shape[out_dim + 1:])
    if (g * minor_in) % minor_out:
        return None
    return g * minor_in // minor_out


def _keeps_batch_dim(node, ins: list[_Val], graph: OpGraph) -> bool:
    """Whether an op with per-example operands works within examples only."""
    prim, params = node.primitive, node.params
    batch = [(x, v) for x, v in zip(ins, node.invars) if x.kind is _Kind.BATCH]
    x, v = batch[0]
    shape = graph.avals[v].shape
    if prim in (prims.reduce_sum_p, prims.reduce_max_p, prims.reduce_min_p, prims.argmax_p,
                prims.argmin_p, prims.reduce_or_p, prims.reduce_and_p, prims.reduce_prod_p):
        return x.dim not in params["axes"]
    if prim in (prims.cumsum_p, prims.cumprod_p, prims.cummax_p, prims.cummin_p,
                prims.cumlogsumexp_p):
        return params["axis"] != x.dim
    if prim is prims.sort_p:
        return params["dimension"] != x.dim and all(y.dim == x.dim for y, _ in batch)
    if prim is prims.rev_p:
        return x.dim not in params["dimensions"]
    if prim is prims.concatenate_p:
        return params["dimension"] != x.dim and all(y.dim == x.dim for y, _ in batch)
    if prim is prims.pad_p:
        return tuple(params["padding_config"][x.dim]) == (0, 0, 0) and len(batch) == 1
    if prim is prims.slice_p:
        return (params["start_indices"][x.dim] == 0 and len(batch) == 1
                and params["limit_indices"][x.dim] == shape[x.dim]
                and (params["strides"] is None or params["strides"][x.dim] == 1))
    if prim is prims.dynamic_slice_p:
        return ins[0].kind is _Kind.BATCH and len(batch) == 1 and \
            params["slice_sizes"][x.dim] == shape[x.dim]
    if prim is prims.dot_general_p:
        (contract_l, contract_r), _ = params["dimension_numbers"]
        lhs, rhs = ins
        return (lhs.kind is not _Kind.BATCH or lhs.dim not in contract_l) and \
            (rhs.kind is not _Kind.BATCH or rhs.dim not in contract_r)
    if prim is prims.gather_p:
        return _gather_keeps_batch(params, ins)
    return False


def _gather_keeps_batch(params, ins: list[_Val]) -> bool:
    numbers = params["dimension_numbers"]
    operand, indices = ins
    if operand.kind is _Kind.BATCH and indices.kind is _Kind.BATCH:
        ob, ib = numbers.operand_batching_dims, numbers.start_indices_batching_dims
        return operand.dim in ob and indices.dim in ib and \
            ob.index(operand.dim) == ib.index(indices.dim)
    if operand.kind is _Kind.BATCH:  # constant indices: the batch dim must be taken whole
        return operand.dim not in numbers.start_index_map and \
            operand.dim not in numbers.collapsed_slice_dims
    return True  # constant table, per-example indices (an embedding lookup)


def _batch_reduction(node, ins: list[_Val]) -> _Val:
    """The value of an op that reduces the batch dim away."""
    prim = node.primitive
    x = next(y for y in ins if y.kind is _Kind.BATCH)
    if prim in _REDUCTIONS and x.dim in node.params["axes"]:
        return _Val(_REDUCTIONS[prim])
    if prim is prims.dot_general_p:
        (contract_l, contract_r), _ = node.params["dimension_numbers"]
        lhs, rhs = ins
        if lhs.kind is _Kind.BATCH and rhs.kind is _Kind.BATCH and lhs.dim in contract_l \
                and rhs.dim in contract_r \
                and contract_l.index(lhs.dim) == contract_r.index(rhs.dim):
            return _Val(_Kind.SUM)
    return _OPAQUE


def _reduced_result(node, ins: list[_Val], graph: OpGraph) -> _Val:
    """An op on batch reductions (SUM / MAX / MIN) and constants."""
    prim = node.primitive
    out_dtype = np.dtype(graph.avals[node.outvars[0]].dtype)
    reduced = [x for x in ins if x.kind is not _Kind.CONST]
    kinds = {x.kind for x in reduced}
    if len(kinds) != 1:
        return _OPAQUE
    kind = kinds.pop()
    if prim in _SHAPE_ONLY or prim is prims.convert_element_type_p:
        in_dtype = np.dtype(graph.avals[node.invars[0]].dtype)
        rounds = np.issubdtype(in_dtype, np.inexact) and not np.issubdtype(out_dtype, np.inexact)
        return _OPAQUE if rounds and kind is _Kind.SUM else reduced[0]
    if kind is _Kind.SUM:
        return _sum_result(node, ins, integer=not np.issubdtype(out_dtype, np.inexact))
    if prim is prims.neg_p:
        return _Val(_Kind.MIN if kind is _Kind.MAX else _Kind.MAX)
    if prim in (prims.add_p, prims.sub_p) and len(reduced) == 1 and (
            prim is prims.add_p or ins[0].kind is kind):
        const = next(x for x in ins if x.kind is _Kind.CONST)
        return reduced[0] if const.invariant else _OPAQUE
    if (prim is prims.max_p and kind is _Kind.MAX) or (prim is prims.min_p and kind is _Kind.MIN):
        return reduced[0] if all(x.invariant for x in ins if x.kind is _Kind.CONST) else _OPAQUE
    if prim in _REDUCTIONS and _REDUCTIONS[prim] is kind:
        return reduced[0]
    return _OPAQUE


def _sum_result(node, ins: list[_Val], *, integer: bool) -> _Val:
    """Linear ops keep a scaled sum a scaled sum; the scale's change is tracked in ``ratio``."""
    prim = node.primitive
    sums = [x for x in ins if x.kind is _Kind.SUM]
    consts = [x for x in ins if x.kind is _Kind.CONST]
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
    if prim is prims.div_p and ins[0].kind is _Kind.SUM and ins[1].kind is _Kind.CONST:
        if integer:
            return _OPAQUE  # integer division rounds
        return _scaled(sums[0], consts[0], invert=True)
    if prim is prims.dot_general_p and len(sums) == 1 and consts[0].invariant:
        return sums[0]
    return _OPAQUE


def _scaled(value: _Val, const: _Val, *, invert: bool) -> _Val:
    if const.num is not None:
        micro, full = const.num
        if micro == 0 or full == 0 or not (math.isfinite(micro) and math.isfinite(full)):
            return _OPAQUE
        change = micro / full if invert else full / micro
        return dataclasses.replace(value, ratio=value.ratio * change)
    return value if const.invariant else _OPAQUE
