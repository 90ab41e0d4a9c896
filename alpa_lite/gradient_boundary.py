"""Where computing gradients ends, in a train step written with `jax.value_and_grad`.

Micro-batching runs the part of a step that reads the batch once per micro-batch and the
rest (the optimizer update) once per step, so it needs the boundary between them. A step
written with `alpa_lite.value_and_grad` marks it; one written with `jax.grad`,
`jax.value_and_grad` or anything built on them (`nnx.value_and_grad`,
`eqx.filter_value_and_grad`, optax's helpers, a `jax.vjp` by hand) does not, and this module
finds it.

Input: the step traced at micro-batch size and at full batch size (the same program; only
batch-sized shapes differ). The boundary is placed right after the last top-level equation
that reads or makes a batch-sized value: everything after it sees the batch only through
values already reduced over it (gradients, the loss, aux values, per-example outputs), which
is the cut `alpa_lite.value_and_grad` would have marked. The values crossing it get a
``grad_boundary`` marker, and `alpa_lite.micro_batching` then classifies each of them
(sum, mean, max, per-example...) from the program itself, or raises an error naming the
value and the primitive where its dependence on the batch could not be followed (BatchNorm
statistics in training mode, say).

Output: both traces with the marker inserted (`mark_gradient_boundary`).
"""

from __future__ import annotations

import dataclasses

import jax
from jax.extend import core as jcore

from alpa_lite._jax_compat import bind_params, equation_context, source_line
from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import INLINE_CALLS
from alpa_lite.markers import grad_boundary_p
from alpa_lite.trace import TracedFunction

# Calls are inlined at the top level first (as the graph inlines them), so the cut can fall
# inside them.
_CALLS = INLINE_CALLS


def has_grad_boundary(jaxpr: jcore.Jaxpr) -> bool:
    """Does the step mark its boundary itself (`alpa_lite.value_and_grad`)?"""
    for eqn in jaxpr.eqns:
        if eqn.primitive is grad_boundary_p:
            return True
        param = _CALLS.get(eqn.primitive)
        if param is not None and has_grad_boundary(eqn.params[param].jaxpr):
            return True
    return False


def mark_gradient_boundary(micro: TracedFunction, full: TracedFunction, *, layers=None):
    """Both traces with a ``grad_boundary`` marker where computing gradients ends, and the
    `LayerRecord` of the layers marked (None without ``layers``).

    Steps that mark it themselves are returned unchanged. ``full`` is the step traced at
    another batch size (the full batch, for micro-batching). With ``layers`` (a function
    ``(closed, cut, crossing variables, names, starts=None) -> (closed, LayerRecord)``, e.g.
    `auto_layers.mark_layers`), both get it instead of the plain marker.

    Raises:
        InvalidConfigError: the traces differ in structure, or no operator reads the batch.
    """
    if has_grad_boundary(micro.closed_jaxpr.jaxpr):
        return micro, full, None
    micro_jaxpr, full_jaxpr = _inline_calls(micro.closed_jaxpr), _inline_calls(full.closed_jaxpr)
    cut, crossing = _find_cut(micro_jaxpr.jaxpr, full_jaxpr.jaxpr, micro.batch_leaves)
    names = _names(micro_jaxpr.jaxpr, crossing, micro.out_tree)
    if layers is None:
        marked = _insert(micro_jaxpr, cut, crossing, names)
        full_marked, record = _insert(full_jaxpr, cut, crossing, names), None
    else:  # both alike: the micro-batch analysis reads them in lockstep
        marked, record = layers(micro_jaxpr, cut, _variables(micro_jaxpr, cut, crossing),
                                names)
        full_marked, _ = layers(full_jaxpr, cut, _variables(full_jaxpr, cut, crossing), names,
                                starts=record.starts)
    return (dataclasses.replace(micro, closed_jaxpr=marked),
            dataclasses.replace(full, closed_jaxpr=full_marked), record)


def _variables(closed: jcore.ClosedJaxpr, cut: int, positions: list[int]) -> list:
    outputs = [v for e in closed.jaxpr.eqns[:cut + 1] for v in e.outvars]
    return [outputs[n] for n in positions]


def _find_cut(micro: jcore.Jaxpr, full: jcore.Jaxpr, batch_leaves) -> tuple[int, list[int]]:
    """(index of the last equation touching a batch-sized value, positions of the values
    defined up to it that later equations or the outputs read, in definition order)."""
    if [e.primitive for e in micro.eqns] != [e.primitive for e in full.eqns]:
        raise InvalidConfigError(
            "The step traces to different programs at micro-batch size and at full batch size "
            "(Python control flow that depends on the batch size?). Make the step's structure "
            "independent of the batch size, or set num_micro_batches=None.")
    batch_sized = {v for v, f, is_batch in zip(micro.invars, full.invars, batch_leaves)
                   if is_batch and v.aval.shape != f.aval.shape}
    last = -1
    for i, (eqn, full_eqn) in enumerate(zip(micro.eqns, full.eqns)):
        made = {v for v, f in zip(eqn.outvars, full_eqn.outvars)
                if getattr(v.aval, "shape", None) != getattr(f.aval, "shape", None)}
        batch_sized |= made
        if made or any(isinstance(v, jcore.Var) and v in batch_sized for v in eqn.invars):
            last = i
    if last < 0:
        raise InvalidConfigError(
            "num_micro_batches needs a step that reads a batch, but no operator of the step "
            "reads a batch-sized value. Check batch_argnums (the batch's position), or set "
            "num_micro_batches=None.")
    defined = {v: n for n, v in enumerate(v for e in micro.eqns[:last + 1] for v in e.outvars)}
    read_after = {v for e in micro.eqns[last + 1:] for v in e.invars if isinstance(v, jcore.Var)}
    read_after |= {v for v in micro.outvars if isinstance(v, jcore.Var)}
    crossing = sorted((defined[v] for v in read_after if v in defined))
    return last, crossing


def _names(jaxpr: jcore.Jaxpr, crossing: list[int], out_tree) -> tuple[str, ...]:
    """A readable name per crossing value: the step output it is, or where it was made."""
    outputs = [v for e in jaxpr.eqns for v in e.outvars]
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(
        jax.tree_util.tree_unflatten(out_tree, list(range(out_tree.num_leaves))))[0]]
    position = {v: i for i, v in enumerate(jaxpr.outvars) if isinstance(v, jcore.Var)}
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    names = []
    for n in crossing:
        var = outputs[n]
        if var in position:
            names.append(f"the step's output {paths[position[var]] or '(the result)'}")
            continue
        eqn = producer[var]
        where = source_line(eqn.source_info)
        names.append(f"the value of `{eqn.primitive.name}`" + (f" at {where}" if where else "")
                     + " that the update reads")
    return tuple(names)


def _inline_calls(closed: jcore.ClosedJaxpr) -> jcore.ClosedJaxpr:
    """``closed`` with its top-level calls (nested jit, custom_jvp/vjp) inlined."""
    if not any(e.primitive in _CALLS for e in closed.jaxpr.eqns):
        return closed
    return retrace(closed)


def _insert(closed: jcore.ClosedJaxpr, cut: int, crossing: list[int], names) -> jcore.ClosedJaxpr:
    variables = _variables(closed, cut, crossing)
    return retrace(closed, after={cut: lambda env: mark_boundary(env, variables, names)})


def mark_boundary(env: dict, variables, names) -> None:
    """Binds the ``grad_boundary`` marker on ``variables`` (in ``env``)."""
    marked = grad_boundary_p.bind(*[env[v] for v in variables],
                                  roles=("aux",) * len(variables), names=tuple(names))
    env.update(zip(variables, marked))


def retrace(closed: jcore.ClosedJaxpr, order=None, before=None, after=None
            ) -> jcore.ClosedJaxpr:
    """Re-traces ``closed``'s top-level equations in ``order`` (default: as they are),
    inlining calls; ``before[i](env)`` / ``after[i](env)`` run around equation ``i`` (they
    may rebind variables in ``env``, e.g. with markers). Source lines and name stacks are
    kept."""
    before, after = before or {}, after or {}
    eqns = closed.jaxpr.eqns
    order = range(len(eqns)) if order is None else order

    def evaluate(jaxpr, consts, args, positions):
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        read = lambda a: a.val if isinstance(a, jcore.Literal) else env[a]  # noqa: E731
        top = positions is not None
        for i in (positions if top else range(len(jaxpr.eqns))):
            eqn = jaxpr.eqns[i]
            if top and i in before:
                before[i](env)
            invals = [read(v) for v in eqn.invars]
            param = _CALLS.get(eqn.primitive)
            if param is not None:
                sub = eqn.params[param]
                sub = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
                outs = evaluate(sub.jaxpr, sub.consts, invals, None)
            else:
                with equation_context(eqn):
                    outs = eqn.primitive.bind(*invals, **bind_params(eqn.primitive, eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
            env.update(zip(eqn.outvars, outs))
            if top and i in after:
                after[i](env)
        return [read(v) for v in jaxpr.outvars]

    def run(*args):
        return evaluate(closed.jaxpr, closed.consts, args, list(order))

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
             for v in closed.jaxpr.invars]
    return jax.make_jaxpr(run)(*avals)
