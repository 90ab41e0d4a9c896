"""Sharding strategies and the einsum-like factor rules that enumerate most of them.

A *spec* says, for each tensor dim, which mesh axes split it (major first): ``(("x",), ())``
is a matrix with rows split over mesh axis ``x``. A `Strategy` of an operator fixes the specs
it requires of its operands, the specs of its outputs, and the collectives it then needs
(e.g. an all-reduce when a contracted dim is split). A `FactorRule` describes an operator as
an einsum over named *factors* (``"m k, k n -> m n"`` with reduction factor ``k``);
`enumerate_factor_strategies` assigns mesh axes to factors in every valid way (Alpa,
OSDI'22 section 4.2; the factor view follows Shardy's sharding rules).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

from alpa_lite.cost.collectives import Collective, estimate_collective_s
from alpa_lite.mesh import LogicalMesh, Spec, format_spec, replicated_spec, spec_shards  # noqa: F401


@dataclasses.dataclass(frozen=True, slots=True)
class CollectiveCall:
    """A collective a strategy performs: its kind, mesh axes and bytes per device."""

    kind: Collective
    axes: tuple[str, ...]
    num_bytes: float


@dataclasses.dataclass(frozen=True, slots=True)
class Strategy:
    """One way to shard one operator.

    Attributes:
        name: readable name, e.g. ``"b@x,n@y|k->AR(x)"``.
        in_specs: the spec each operand must have (None for literals and scalars).
        out_specs: the spec of each output.
        comm_s: time of the collectives the strategy needs after its local compute.
        collectives: those collectives, for summaries and fidelity checks.
        work_divisor: into how many parts the operator's compute is split.
        fallback: True when no rule knew this primitive and it was replicated.
    """

    name: str
    in_specs: tuple[Spec | None, ...]
    out_specs: tuple[Spec, ...]
    comm_s: float = 0.0
    collectives: tuple[CollectiveCall, ...] = ()
    work_divisor: int = 1
    fallback: bool = False


@dataclasses.dataclass(frozen=True)
class FactorRule:
    """An operator seen as an einsum over named factors.

    Attributes:
        operands: per operand, per dim, the factor name (None: the dim may not be split).
        results: per result, per dim, the factor name (None: may not be split).
        factor_sizes: ``(factor, size)`` pairs.
        reduction: factors that are summed (or max-ed) away: splitting one needs an all-reduce.
        heavy: compute-heavy operator (dot, conv) whose work the planner splits over every mesh
            axis when any allowed strategy can (Alpa's behaviour: no replicated matmuls).
        allow_reduce_scatter: also offer strategies that scatter the reduced result along a
            result dim instead of all-reducing it (needed for ZeRO-style plans).

    Example:
        >>> rule = FactorRule.parse("m k, k n -> m n", {"m": 8, "k": 4, "n": 8}, reduction="k")
        >>> mesh = LogicalMesh(shape=(2, 4))
        >>> [s.name for s in enumerate_factor_strategies(rule, mesh, 4)][:3]
        ['R', 'k@y->AR', 'm@y']
    """

    operands: tuple[tuple[str | None, ...], ...]
    results: tuple[tuple[str | None, ...], ...]
    factor_sizes: tuple[tuple[str, int], ...]
    reduction: frozenset[str] = frozenset()
    heavy: bool = False
    allow_reduce_scatter: bool = False

    @classmethod
    def parse(cls, spec: str, sizes: dict[str, int], *, reduction: str = "", **kw) -> "FactorRule":
        lhs, rhs = spec.split("->")
        parse_ops = lambda text: tuple(
            tuple(None if f == "_" else f for f in op.split()) for op in text.split(",")
        )
        return cls(parse_ops(lhs), parse_ops(rhs), tuple(sorted(sizes.items())),
                   frozenset(reduction.split()), **kw)


def enumerate_factor_strategies(
    rule: FactorRule, mesh: LogicalMesh, result_itemsize_bytes: int, *,
    allow_mixed_mesh_shape: bool = True,
) -> list[Strategy]:
    """Every assignment of mesh axes to factors that divides the factors evenly.

    Each mesh axis of size > 1 is given to at most one factor; a factor may take several axes
    (in mesh order) only when ``allow_mixed_mesh_shape`` (a dim split over the flattened
    mesh, next to dims split over one axis; Alpa leaves this off by default). Splitting a
    reduction factor over axes R costs an all-reduce of the result over R (or a
    reduce-scatter variant). Results are cached per (rule, mesh, options).
    """
    return list(_enumerate_cached(rule, mesh, result_itemsize_bytes, allow_mixed_mesh_shape))


@functools.lru_cache(maxsize=65536)
def _enumerate_cached(rule: FactorRule, mesh: LogicalMesh, itemsize: int,
                      allow_mixed: bool) -> tuple[Strategy, ...]:
    sizes = dict(rule.factor_sizes)
    factors = [f for f in sizes if sizes[f] > 1]
    axes = mesh.sharding_axes
    strategies = []
    for choice in itertools.product([None, *factors], repeat=len(axes)):
        assign: dict[str, tuple[str, ...]] = {}
        for axis, factor in zip(axes, choice):
            if factor is not None:
                assign[factor] = assign.get(factor, ()) + (axis,)
        if any(sizes[f] % mesh.axes_size(a) for f, a in assign.items()):
            continue
        if not allow_mixed and any(len(a) > 1 for a in assign.values()):
            continue
        strategies.extend(_strategies_for_assignment(rule, mesh, assign, itemsize))
    return tuple(strategies)


def _strategies_for_assignment(rule, mesh, assign, itemsize) -> list[Strategy]:
    spec_of = lambda dims: tuple(assign.get(f, ()) if f is not None else () for f in dims)
    in_specs = tuple(spec_of(op) for op in rule.operands)
    out_specs = tuple(spec_of(res) for res in rule.results)
    work = math.prod(mesh.axes_size(a) for a in assign.values())
    reduce_axes = tuple(a for a in mesh.axis_names
                        for f, fa in assign.items() if f in rule.reduction and a in fa)
    name = ",".join(f"{f}@{''.join(a)}" for f, a in sorted(assign.items())) or "R"
    if not reduce_axes:
        return [Strategy(name, in_specs, out_specs, work_divisor=work)]
    sizes = dict(rule.factor_sizes)
    result_elems = [math.prod(sizes[f] if f else 1 for f in res) for res in rule.results]
    out_bytes = sum(n * itemsize / spec_shards(s, mesh) for n, s in zip(result_elems, out_specs))
    all_reduce = CollectiveCall(Collective.ALL_REDUCE, reduce_axes, out_bytes)
    result = [Strategy(f"{name}->AR", in_specs, out_specs,
                       estimate_collective_s(Collective.ALL_REDUCE, mesh, reduce_axes, out_bytes),
                       (all_reduce,), work)]
    if rule.allow_reduce_scatter and len(rule.results) == 1:
        result.extend(_reduce_scatter_variants(rule, mesh, assign, in_specs, out_specs[0],
                                               reduce_axes, out_bytes, name, work))
    return result


def _reduce_scatter_variants(rule, mesh, assign, in_specs, out_spec, reduce_axes, out_bytes,
                             name, work) -> list[Strategy]:
    sizes = dict(rule.factor_sizes)
    n_scatter = mesh.axes_size(reduce_axes)
    variants = []
    for dim, factor in enumerate(rule.results[0]):
        if factor is None or factor in assign or sizes[factor] % n_scatter:
            continue
        scattered = out_spec[:dim] + (reduce_axes,) + out_spec[dim + 1:]
        call = CollectiveCall(Collective.REDUCE_SCATTER, reduce_axes, out_bytes)
        cost = estimate_collective_s(Collective.REDUCE_SCATTER, mesh, reduce_axes, out_bytes)
        variants.append(Strategy(f"{name}->RS{dim}", in_specs, (scattered,), cost, (call,), work))
    return variants


def replicated_strategy(num_operands_ranks: Sequence[int | None], out_ranks: Sequence[int],
                        *, fallback: bool) -> Strategy:
    """Every operand and result replicated: always correct, never fast."""
    in_specs = tuple(None if r is None else replicated_spec(r) for r in num_operands_ranks)
    out_specs = tuple(replicated_spec(r) for r in out_ranks)
    return Strategy("replicated", in_specs, out_specs, fallback=fallback)
