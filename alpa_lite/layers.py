"""Layer construction: rewrite a loss function so that its layers are marked.

`alpa_lite.grad` applies `build_layer_transform(option)` to the loss function while a pipelined
step is traced. The transform traces the loss to a jaxpr, decides where layers start (at the
`mark_pipeline_boundary()` calls, or by `inter_op.layering`), and re-evaluates the jaxpr with
`layer_boundary` markers on the values entering and leaving each layer. Differentiation then
mirrors the markers into the backward pass.

Automatic layers compare two clusterings and keep the better balanced one: Alpa's (balanced
flops, small boundaries) and the model's own modules (flax names such as ``block_3`` survive in
each equation's name stack).

Scanned layers: with `AutoLayerOption(layer_num=n)`, every top-level ``scan`` of length L >= 2
is first split into consecutive scans (`split_scans`): each reads its slice of the stacked
operands (``xs[a:b]``) and the stacked results are concatenated back. The cuts are where n
layers of equal flops would end if the scans were unrolled, counting the equations around
them (an embedding before, a vocabulary head after), so the layering can balance the layers
like any others; the backward pass mirrors the pieces.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from alpa_lite._jax_compat import bind_params, scan_operand_counts
from alpa_lite.config import AutoLayerOption, ManualLayerOption
from alpa_lite.cost.registry import estimate_op_cost, nbytes
from alpa_lite.errors import InvalidConfigError
from alpa_lite.inter_op.layering import cluster_layers, group_by_names, imbalance
from alpa_lite.markers import manual_boundary_p, mark_layer

logger = logging.getLogger(__name__)

_MODULE = re.compile(r"(?<![\w])([A-Za-z][A-Za-z_]*?_\d+)(?![\w])")


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What a trace decided about pipeline layers (saved with a pipeline plan, so a loaded
    plan traces the same layers).

    Attributes:
        starts: equation indices (of the loss function, or of the forward pass for automatic
            layers) where layers start.
        remat_layers: per layer, whether its forward is recomputed in the backward pass.
        method: how the starts were chosen: ``"manual"``, ``"cost"``, ``"names"``, or
            ``"given"`` (passed in, e.g. from a loaded plan).
        num_layers: the number of layers asked for (the option's ``layer_num``).
        imbalance: the chosen layering's flops imbalance (None when not measured).
        candidates: each candidate method's imbalance (automatic layering).
        automatic: the layers were placed on a program differentiated by jax
            (`auto_layers`), not on a loss function wrapped by `alpa_lite.grad`.
    """

    starts: tuple[int, ...]
    remat_layers: tuple[bool, ...] = ()
    method: str = "given"
    num_layers: int | None = None
    imbalance: float | None = None
    candidates: dict | None = None
    automatic: bool = False

    def to_dict(self) -> dict:
        out = {"starts": list(self.starts), "remat_layers": list(self.remat_layers),
               "method": self.method}
        for key in ("num_layers", "imbalance", "candidates"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.automatic:
            out["automatic"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LayerRecord":
        return cls(starts=tuple(data["starts"]),
                   remat_layers=tuple(bool(f) for f in data.get("remat_layers", ())),
                   method=data.get("method", "given"), num_layers=data.get("num_layers"),
                   imbalance=data.get("imbalance"), candidates=data.get("candidates"),
                   automatic=bool(data.get("automatic", False)))


class LayerTransform:
    """``transform(loss_fn) -> loss_fn with layer markers`` for a layer option
    (`build_layer_transform`); after a trace, ``record`` holds the `LayerRecord` it decided."""

    def __init__(self, option, starts=None, remat_layers=None):
        self.option, self.starts, self.remat_layers = option, starts, remat_layers
        self.record: LayerRecord | None = None

    def __call__(self, fun: Callable) -> Callable:
        def marked(*args):
            closed = jax.make_jaxpr(fun)(*args)
            option = self.option
            if isinstance(option, AutoLayerOption) and option.layer_num > 1:
                closed = split_scans(closed, option.layer_num)
            chosen = (choose_layer_starts(closed.jaxpr, option) if self.starts is None
                      else LayerRecord(tuple(self.starts)))
            remat = resolve_remat_layers(option, self.remat_layers, len(chosen.starts))
            self.record = dataclasses.replace(chosen, remat_layers=tuple(remat))
            leaves = jax.tree_util.tree_leaves(args)
            outs = evaluate_with_markers(closed, leaves, list(chosen.starts), remat)
            out_tree = jax.tree_util.tree_structure(jax.eval_shape(fun, *args))
            return jax.tree_util.tree_unflatten(out_tree, outs)

        return marked


def build_layer_transform(option, starts: Sequence[int] | None = None,
                          remat_layers: Sequence[bool] | bool | None = None) -> LayerTransform:
    """The layer transform of a layer option (`LayerTransform`).

    Given ``starts`` (e.g. from the record of a trace at another batch size), they are used as
    is. ``remat_layers`` (one flag per layer, or one for all) wraps the flagged layers' forward
    in `jax.checkpoint`; default: the option's ``remat_layer`` when it is True, else none.
    """
    return LayerTransform(option, None if starts is None else list(starts), remat_layers)


def split_scans(closed: jcore.ClosedJaxpr, pieces: int) -> jcore.ClosedJaxpr:
    """``closed`` with its top-level scans of length >= 2 cut where ``pieces`` layers of
    equal flops would end (`scan_cuts`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda c, xs: jax.lax.scan(lambda c, x: (c + x, c), c, xs)
        >>> closed = jax.make_jaxpr(f)(0.0, jnp.arange(6.0))
        >>> [e.primitive.name for e in split_scans(closed, 2).jaxpr.eqns].count("scan")
        2
    """
    cuts = scan_cuts(closed.jaxpr, pieces)
    if not any(len(edges) > 2 for edges in cuts.values()):
        return closed

    def run(*args):
        jaxpr = closed.jaxpr
        env = dict(zip(jaxpr.constvars, closed.consts))
        env.update(zip(jaxpr.invars, args))
        read = lambda a: a.val if isinstance(a, jcore.Literal) else env[a]  # noqa: E731
        for i, eqn in enumerate(jaxpr.eqns):
            invals = list(map(read, eqn.invars))
            if len(cuts.get(i, ())) > 2:
                outs = _bind_split_scan(eqn.params, invals, cuts[i])
            else:
                outs = eqn.primitive.bind(*invals, **bind_params(eqn.primitive, eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(run)(*avals)


def scan_cuts(jaxpr: jcore.Jaxpr, pieces: int) -> dict[int, list[int]]:
    """Per top-level scan of length >= 2 (by equation index): its piece edges
    ``[0, ..., length]``, where ``pieces`` layers of equal flops would end if every scan were
    unrolled into its iterations (a scan whose flops are unknown is cut evenly).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> def f(xs, head):  # 4 iterations of a 8x8x8 matmul, then a head worth two
        ...     return jax.lax.scan(lambda c, x: (c @ x, None), xs[0], xs)[0] @ head
        >>> jaxpr = jax.make_jaxpr(f)(jnp.ones((4, 8, 8)), jnp.ones((8, 16))).jaxpr
        >>> scan_cuts(jaxpr, 2)  # {equation: edges}: 3 iterations | 1 iteration + the head
        {2: [0, 3, 4]}
    """
    flops = [_eqn_flops(e) for e in jaxpr.eqns]
    total = sum(flops)
    targets = [total * j / pieces for j in range(1, pieces)]
    cuts, before = {}, 0.0
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive is prims.scan_p and eqn.params["length"] >= 2:
            length = eqn.params["length"]
            if flops[i] > 0:
                inside = [round((t - before) / (flops[i] / length)) for t in targets
                          if before < t < before + flops[i]]
                if eqn.params["reverse"]:  # iterations run from the end
                    inside = [length - c for c in inside]
            else:
                inside = np.linspace(0, length, min(pieces, length) + 1).round()[1:-1]
            cuts[i] = sorted({0, length} | {int(c) for c in inside if 0 < c < length})
        before += flops[i]
    return cuts


def _bind_split_scan(params: dict, invals: list, edges: list[int]) -> list:
    n_const, n_carry = scan_operand_counts(params)
    consts, carry, xs = (invals[:n_const], invals[n_const:n_const + n_carry],
                         invals[n_const + n_carry:])
    spans = list(zip(edges[:-1], edges[1:]))
    ys_parts: dict[int, list] = {}
    for a, b in (reversed(spans) if params["reverse"] else spans):
        piece_xs = [jax.lax.slice_in_dim(x, int(a), int(b), axis=0) for x in xs]
        outs = prims.scan_p.bind(
            *consts, *carry, *piece_xs,
            **bind_params(prims.scan_p, dict(params, length=int(b - a))))
        carry, ys_parts[int(a)] = outs[:n_carry], outs[n_carry:]
    ordered = [ys_parts[int(a)] for a, _ in spans]
    ys = [jax.lax.concatenate([part[k] for part in ordered], 0)
          for k in range(len(ordered[0]))]
    return list(carry) + ys


def choose_layer_starts(jaxpr: jcore.Jaxpr, option) -> LayerRecord:
    """Equation indices where layers start, with how they were chosen."""
    eqns = jaxpr.eqns
    if isinstance(option, ManualLayerOption):
        starts = [0] + [i + 1 for i, e in enumerate(eqns) if e.primitive is manual_boundary_p]
        starts = sorted(set(s for s in starts if s < len(eqns)))
        return LayerRecord(tuple(starts), method="manual", num_layers=len(starts))
    if not isinstance(option, AutoLayerOption):
        raise InvalidConfigError(f"Unknown layer option {option!r}.")
    flops = np.array([_eqn_flops(e) for e in eqns])
    if option.layer_num > len(eqns):
        raise InvalidConfigError(
            f"AutoLayerOption(layer_num={option.layer_num}) but the loss function has only "
            f"{len(eqns)} equations; use a smaller layer_num.")
    candidates = {}
    if option.method in ("auto", "cost"):
        candidates["cost"] = cluster_layers(flops, _cut_bytes(jaxpr), option.layer_num,
                                            eps=option.eps)
    if option.method in ("auto", "names"):
        by_names = group_by_names(_module_names(eqns), flops, option.layer_num)
        if by_names is not None:
            candidates["names"] = by_names
        elif option.method == "names":
            raise InvalidConfigError(
                f"layer method 'names' needs at least {option.layer_num} repeated modules named "
                "like 'block_0', 'block_1', ...; none were found. Use method='cost'.")
    scores = {name: imbalance(flops, starts) for name, starts in candidates.items()}
    method = min(scores, key=lambda name: (round(scores[name], 6), name != "names"))
    logger.info("layer clustering: %s", scores)
    return LayerRecord(tuple(candidates[method]), method=method, num_layers=option.layer_num,
                       imbalance=scores[method], candidates=scores)


def _eqn_flops(eqn) -> float:
    avals_in = [v.aval for v in eqn.invars]
    avals_out = [v.aval for v in eqn.outvars]
    return estimate_op_cost(eqn.primitive, eqn.params, avals_in, avals_out).flops


def _cut_bytes(jaxpr: jcore.Jaxpr) -> np.ndarray:
    """Bytes of values defined at or before equation i and used after it (for each i)."""
    n = len(jaxpr.eqns)
    defined, last_use = {}, {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jcore.Var) and v in defined:
                last_use[v] = i
        for v in eqn.outvars:
            defined[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var) and v in defined:
            last_use[v] = n
    diff = np.zeros(n + 1)
    for v, first in defined.items():
        last = last_use.get(v, first)
        if last > first:
            diff[first] += nbytes(v.aval)
            diff[last] -= nbytes(v.aval)
    return np.cumsum(diff)[: n - 1]


def _module_names(eqns) -> list[str | None]:
    """The outermost indexed flax module (``block_3``) of each equation, if any."""
    names = []
    for eqn in eqns:
        found = _MODULE.findall(str(eqn.source_info.name_stack))
        names.append(found[0] if found else None)
    counts: dict[str, int] = {}
    for name in names:
        if name is not None:
            counts[name.rsplit("_", 1)[0]] = counts.get(name.rsplit("_", 1)[0], 0) + 1
    if not counts:
        return names
    family = max(counts, key=counts.get)
    return [n if n is not None and n.rsplit("_", 1)[0] == family else None for n in names]


def resolve_remat_layers(option, remat_layers: Sequence[bool] | bool | None,
                         num_layers: int) -> tuple[bool, ...]:
    """One rematerialization flag per layer, from an explicit choice or the layer option.

    ``remat_layer="auto"`` on the option means "the planner decides"; until it has (the first
    trace, which prices both variants), no layer is rematerialized.

    Raises:
        InvalidConfigError: ``remat_layers`` has a length other than ``num_layers``.
    """
    if remat_layers is None:
        remat_layers = getattr(option, "remat_layer", False) is True
    if isinstance(remat_layers, bool):
        return (remat_layers,) * num_layers
    flags = tuple(bool(f) for f in remat_layers)
    if len(flags) != num_layers:
        raise InvalidConfigError(
            f"remat_layers needs one flag per layer ({num_layers}); got {len(flags)}: "
            f"{list(flags)}. Pass a bool for all layers or one flag per layer.")
    return flags


def evaluate_with_markers(closed: jcore.ClosedJaxpr, args, starts: list[int],
                          remat: Sequence[bool] | None = None) -> list:
    """Evaluates ``closed`` on ``args`` with start/end markers around each layer; the
    layers flagged in ``remat`` run inside `jax.checkpoint` (only the values entering them
    are kept for the backward pass, which recomputes the rest)."""
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    bounds = list(starts) + [len(jaxpr.eqns)]
    remat = (False,) * len(starts) if remat is None else tuple(remat)
    later_uses = _later_uses(jaxpr)
    for layer, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        eqns = jaxpr.eqns[lo:hi]
        produced = {v for e in eqns for v in e.outvars}
        entering = list(dict.fromkeys(v for e in eqns for v in e.invars
                                      if isinstance(v, jcore.Var) and v not in produced))
        leaving = [v for e in eqns for v in e.outvars if later_uses.get(v, -1) >= hi]
        _mark(env, entering, layer, "start")
        run = functools.partial(_run_equations, eqns, entering, leaving)
        if remat[layer]:
            run = jax.checkpoint(run, prevent_cse=True)
        env.update(zip(leaving, run(*[env[v] for v in entering])))
        _mark(env, leaving, layer, "end")
    return [a.val if isinstance(a, jcore.Literal) else env[a] for a in jaxpr.outvars]


def _run_equations(eqns, entering, leaving, *values) -> list:
    """Evaluates ``eqns`` given the ``entering`` variables' values; returns ``leaving``'s."""
    env = dict(zip(entering, values))
    read = lambda a: a.val if isinstance(a, jcore.Literal) else env[a]
    for eqn in eqns:
        if eqn.primitive is manual_boundary_p:
            continue
        outs = eqn.primitive.bind(*map(read, eqn.invars),
                                  **bind_params(eqn.primitive, eqn.params))
        env.update(zip(eqn.outvars, outs if eqn.primitive.multiple_results else [outs]))
    return [env[v] for v in leaving]


def _later_uses(jaxpr) -> dict:
    last = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                last[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            last[v] = len(jaxpr.eqns)
    return last


def _mark(env: dict, variables, layer: int, kind: str) -> None:
    """Marks the floating-point values among ``variables`` (others are never differentiated)."""
    chosen = [v for v in variables if jax.numpy.issubdtype(v.aval.dtype, jax.numpy.inexact)]
    if chosen:
        env.update(zip(chosen, mark_layer([env[v] for v in chosen], layer=layer, kind=kind)))
