"""Pipeline layers for a train step differentiated by jax itself (`jax.value_and_grad`).

`alpa_lite.value_and_grad` builds layers into the loss function before differentiating it,
and differentiation mirrors its markers into the backward pass. A step written with
`jax.value_and_grad` (or `nnx.value_and_grad`, ...) is already differentiated when we see
it, so the layers are built on its traced program instead:

1. the compute part (up to the gradient boundary, `alpa_lite.gradient_boundary`) splits
   into the forward pass and the backward pass: jax names every equation its transposition
   made ``transpose(...)``; an equation reading a backward value belongs to the backward
   pass too;
2. the forward pass gets layers as a loss function would (`layers.choose_layer_starts`:
   Alpa's clustering or the model's module names, or `mark_pipeline_boundary()` calls);
3. each backward equation belongs to the layer whose forward values (residuals) it reads,
   the latest of them, but never to a later layer than the backward values it reads (so the
   backward pass can run layer by layer, last layer first); one reading neither belongs to
   the last layer (the seed of the backward pass);
4. the program is re-traced in that order with ``layer_boundary`` markers around each
   forward and backward layer (the markers `alpa_lite.value_and_grad` would have made) and
   the ``grad_boundary`` marker after the compute part.

What this cannot do: rematerialize layers (that needs the forward wrapped in
`jax.checkpoint` before differentiation: use `alpa_lite.value_and_grad`), or split one
scanned stack of layers across stages (a scan's backward is one equation).
"""

from __future__ import annotations

import bisect
import dataclasses
import types

import jax.numpy as jnp
from jax.extend import core as jcore

from alpa_lite.errors import InvalidConfigError
from alpa_lite.gradient_boundary import mark_boundary, retrace
from alpa_lite.layers import LayerRecord, choose_layer_starts, resolve_remat_layers
from alpa_lite.markers import layer_boundary_p


def mark_layers(closed: jcore.ClosedJaxpr, cut: int, crossing: list, names, option, *,
                starts=None, remat_layers=None) -> tuple[jcore.ClosedJaxpr, LayerRecord]:
    """``closed`` (calls inlined) with layer markers in its compute part (equations up to
    ``cut``) and the gradient boundary on ``crossing`` (variables) after it, and the layer
    layers chosen (pass their ``starts`` to mark a trace at another batch size alike).

    Raises:
        InvalidConfigError: no backward pass, or rematerialization asked for.
    """
    eqns = closed.jaxpr.eqns
    backward = _backward_equations(eqns[:cut + 1])
    if not backward:
        raise InvalidConfigError(
            "PipeshardParallel pipelines a train step's forward and backward passes, but this "
            "step computes no gradient before its update (no equation of jax's "
            "differentiation was found). Compute gradients with jax.value_and_grad or "
            "alpa_lite.value_and_grad inside the step.")
    forward = [i for i in range(cut + 1) if i not in backward]
    chosen = _forward_starts(eqns, forward, option, starts)
    layer_starts = list(chosen.starts)
    num_layers = len(layer_starts)
    remat = resolve_remat_layers(option, remat_layers if remat_layers is not None else
                                 (option.remat_layer is True), num_layers)
    if any(remat):
        raise InvalidConfigError(
            "Rematerialized pipeline layers need the gradient taken with "
            "alpa_lite.value_and_grad (the layers' forward is wrapped in jax.checkpoint before "
            "differentiation); this step differentiates with jax's own. Replace the call, or "
            "use remat_layer=False.")
    forward_layer = {i: bisect.bisect_right(layer_starts, n) - 1 for n, i in enumerate(forward)}
    backward_layer = _backward_layers(eqns, sorted(backward), forward_layer, num_layers)
    ordered_backward = sorted(backward, key=lambda i: (-backward_layer[i], i))
    regions = [[i for i in forward if forward_layer[i] == layer] for layer in range(num_layers)]
    regions += [[i for i in ordered_backward if backward_layer[i] == layer]
                for layer in reversed(range(num_layers))]
    kinds = [(layer, False) for layer in range(num_layers)] + \
        [(layer, True) for layer in reversed(range(num_layers))]
    order = [i for region in regions for i in region] + list(range(cut + 1, len(eqns)))
    before, after = {}, {}
    for (layer, is_backward), region in zip(kinds, regions):
        if region:
            entering, leaving = _region_borders(eqns, region, closed.jaxpr.outvars)
            before[region[0]], after[region[-1]] = _markers(entering, leaving, layer,
                                                            is_backward)
    compute_end, end_marker = order[cut], after.get(order[cut])

    def close(env):  # the last region's end, then the gradient boundary
        if end_marker is not None:
            end_marker(env)
        mark_boundary(env, crossing, names)

    after[compute_end] = close
    return retrace(closed, order, before, after), dataclasses.replace(
        chosen, remat_layers=(False,) * num_layers, automatic=True)


def _backward_equations(eqns) -> set[int]:
    """Equations of jax's backward pass: named ``transpose(...)``, or reading one's result."""
    backward, values = set(), set()
    for i, eqn in enumerate(eqns):
        reads = any(isinstance(v, jcore.Var) and v in values for v in eqn.invars)
        if reads or "transpose(" in str(eqn.source_info.name_stack):
            backward.add(i)
            values.update(eqn.outvars)
    return backward


def _forward_starts(eqns, forward: list[int], option, starts):
    """Layer starts (positions in ``forward``) chosen on the forward pass as on a loss."""
    if starts is not None:
        return LayerRecord(tuple(starts))
    inside = set(forward)
    read_later = {v for i, e in enumerate(eqns) if i not in inside for v in e.invars
                  if isinstance(v, jcore.Var)}
    forward_eqns = [eqns[i] for i in forward]
    outvars = [v for e in forward_eqns for v in e.outvars if v in read_later]
    view = types.SimpleNamespace(eqns=forward_eqns, outvars=outvars)
    return choose_layer_starts(view, option)


def _backward_layers(eqns, backward: list[int], forward_layer: dict, num_layers: int) -> dict:
    made_by = {v: i for i, e in enumerate(eqns) for v in e.outvars}
    layer_of_value: dict = {}
    result = {}
    for i in backward:
        residual, upstream = [], []
        for v in eqns[i].invars:
            if not isinstance(v, jcore.Var) or v not in made_by:
                continue
            producer = made_by[v]
            if producer in forward_layer:
                residual.append(forward_layer[producer])
            elif v in layer_of_value:
                upstream.append(layer_of_value[v])
        layer = max(residual) if residual else num_layers - 1
        if upstream:
            layer = min(layer, min(upstream))
        result[i] = layer
        layer_of_value.update({v: layer for v in eqns[i].outvars})
    return result


def _region_borders(eqns, region: list[int], outvars) -> tuple[list, list]:
    """(floating variables a region reads from outside, those it makes that others read)."""
    inside = set(region)
    made = {v for i in region for v in eqns[i].outvars}
    entering = list(dict.fromkeys(v for i in region for v in eqns[i].invars
                                  if isinstance(v, jcore.Var) and v not in made))
    read_outside = {v for i, e in enumerate(eqns) if i not in inside for v in e.invars
                    if isinstance(v, jcore.Var)} | {v for v in outvars
                                                     if isinstance(v, jcore.Var)}
    leaving = [v for i in region for v in eqns[i].outvars if v in read_outside]
    floating = lambda vs: [v for v in vs if jnp.issubdtype(v.aval.dtype, jnp.inexact)]  # noqa
    return floating(entering), floating(leaving)


def _markers(entering, leaving, layer: int, backward: bool):
    """Hooks around a region: the start marker rebinds the values entering it for its own
    equations only (others, e.g. the update reading a parameter, keep the original); the
    end marker rebinds the values leaving it for everything after."""
    saved = {}

    def start(env):
        saved.update((v, env[v]) for v in entering)
        if entering:
            env.update(zip(entering, layer_boundary_p.bind(
                *[env[v] for v in entering], layer=layer, kind="start", backward=backward)))

    def end(env):
        env.update(saved)
        if leaving:
            env.update(zip(leaving, layer_boundary_p.bind(
                *[env[v] for v in leaving], layer=layer, kind="end", backward=backward)))

    return start, end
