"""Marker primitives and the gradient functions that insert them.

Two identity primitives carry structure through tracing and differentiation:

* ``grad_boundary``: bound on the outputs of `alpa_lite.grad` / `alpa_lite.value_and_grad`. It
  separates *computing* gradients (run once per micro-batch) from *applying* them (run once
  per step).
* ``layer_boundary``: bound on the values entering (``start``) and leaving (``end``) a layer.
  Its transpose rule binds the mirrored marker on the cotangents, so forward layer ``i`` and
  its backward pass can both be sliced out of one traced train step.

Both lower to nothing: the compiled program is the same as without them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Sequence

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

# --- the primitives --------------------------------------------------------------------------


def _identity_primitive(name: str) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = True
    prim.def_impl(lambda *args, **_: args)
    prim.def_abstract_eval(lambda *avals, **_: avals)
    mlir.register_lowering(prim, lambda ctx, *args, **_: list(args))
    batching.primitive_batchers[prim] = lambda args, dims, **kw: (prim.bind(*args, **kw), dims)
    return prim


grad_boundary_p = _identity_primitive("grad_boundary")
layer_boundary_p = _identity_primitive("layer_boundary")
manual_boundary_p = _identity_primitive("manual_pipeline_boundary")


def _grad_boundary_jvp(primals, tangents, **params):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return grad_boundary_p.bind(*primals, **params), list(tangents)


ad.primitive_jvps[grad_boundary_p] = _grad_boundary_jvp
ad.deflinear2(manual_boundary_p, lambda cts, *_: list(cts))


def _layer_jvp(primals, tangents, *, layer: int, kind: str, backward: bool):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    outs = layer_boundary_p.bind(*primals, layer=layer, kind=kind, backward=backward)
    touts = layer_boundary_p.bind(*tangents, layer=layer, kind=kind, backward=backward)
    return outs, touts


def _layer_transpose(cts, *args, layer: int, kind: str, backward: bool):
    cts = [ad.instantiate_zeros(ct) for ct in cts]
    mirrored = "end" if kind == "start" else "start"
    return layer_boundary_p.bind(*cts, layer=layer, kind=mirrored, backward=not backward)


ad.primitive_jvps[layer_boundary_p] = _layer_jvp
ad.primitive_transposes[layer_boundary_p] = _layer_transpose


def mark_layer(values: Sequence, *, layer: int, kind: str) -> list:
    """Binds a forward ``layer_boundary`` marker on ``values`` (kind ``"start"`` or ``"end"``)."""
    return list(layer_boundary_p.bind(*values, layer=layer, kind=kind, backward=False))


def mark_pipeline_boundary() -> None:
    """Marks a layer boundary at this point of a model, for ``layer_option="manual"``.

    Call it between layers inside the loss function; equations traced before the call belong
    to the previous layer, those after it to the next one.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> def loss(w, x):
        ...     x = jnp.tanh(x @ w)
        ...     mark_pipeline_boundary()
        ...     return jnp.sum(x @ w)
        >>> "manual_pipeline_boundary" in str(jax.make_jaxpr(loss)(jnp.ones((2, 2)), jnp.ones((1, 2))))
        True
    """
    manual_boundary_p.bind()


# --- layer construction hook -----------------------------------------------------------------
# `parallelize` installs a layer-construction function while it traces a pipelined step; the
# gradient functions below apply it to the loss function before differentiating, so that the
# layer markers end up in both the forward and the backward pass. Outside such a trace it is
# None and the gradient functions are plain jax.grad plus a boundary marker.

_LAYER_CONSTRUCTION: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "alpa_lite_layer_construction", default=None
)


@contextlib.contextmanager
def layer_construction(transform: Callable[[Callable], Callable] | None):
    """Within the block, `grad`/`value_and_grad` apply ``transform`` to the loss function."""
    token = _LAYER_CONSTRUCTION.set(transform)
    try:
        yield
    finally:
        _LAYER_CONSTRUCTION.reset(token)


def _with_layers(fun: Callable) -> Callable:
    transform = _LAYER_CONSTRUCTION.get()
    return fun if transform is None else transform(fun)


def _mark_outputs(loss: Any, aux: Any, grads: Any) -> tuple[Any, Any, Any]:
    """Binds the boundary on the loss, aux and gradient leaves, recording each one's role.

    The roles and readable names let micro-batching combine each value the way serial
    execution computes it (`alpa_lite.micro_batching`) and name a value it cannot.
    """
    parts = {"loss": loss, "aux": aux, "grad": grads}
    leaves, roles, names, treedefs = [], [], [], {}
    for role, tree in parts.items():
        with_paths, treedefs[role] = jax.tree_util.tree_flatten_with_path(tree)
        for path, leaf in with_paths:
            leaves.append(leaf)
            roles.append(role)
            names.append("the loss" if role == "loss" else
                          f"{role}{jax.tree_util.keystr(path)}")
    marked = iter(grad_boundary_p.bind(*leaves, roles=tuple(roles), names=tuple(names)))
    return tuple(jax.tree_util.tree_unflatten(treedefs[role], [next(marked) for _ in range(
        treedefs[role].num_leaves)]) for role in parts)


def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                   **kwargs) -> Callable:
    """Like `jax.value_and_grad`, and marks where computing gradients ends.

    Under ``ShardParallel(num_micro_batches=k)`` or `PipeshardParallel`, everything this
    function computes (value, aux and gradients) is computed per micro-batch and the rest of
    the train step runs once per step. Each returned value is rebuilt from the micro-batch
    values exactly as the full batch would compute it: sums are summed, means averaged,
    maxima and minima taken again, per-example values put back in batch order, and gradients
    combined like the loss (which must be a sum or a mean over the batch). A value that is
    none of these (a ratio of two sums, say) raises `InvalidConfigError`, never a different
    number.

    Example:
        >>> import jax.numpy as jnp
        >>> value_and_grad(lambda w: jnp.sum(w ** 2))(jnp.ones(2))
        (Array(2., dtype=float32), Array([2., 2.], dtype=float32))
    """

    @functools.wraps(fun)
    def wrapped(*args, **kw):
        inner = jax.value_and_grad(_with_layers(fun), argnums=argnums, has_aux=has_aux, **kwargs)
        value, grads = inner(*args, **kw)
        loss, aux = value if has_aux else (value, None)
        loss, aux, grads = _mark_outputs(loss, aux, grads)
        return ((loss, aux) if has_aux else loss), grads

    return wrapped


def grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
         **kwargs) -> Callable:
    """Like `jax.grad`, and marks where computing gradients ends (see `value_and_grad`).

    Example:
        >>> import jax.numpy as jnp
        >>> grad(lambda w: jnp.sum(w ** 2))(jnp.ones(2))
        Array([2., 2.], dtype=float32)
    """

    @functools.wraps(fun)
    def wrapped(*args, **kw):
        inner = jax.value_and_grad(_with_layers(fun), argnums=argnums, has_aux=has_aux, **kwargs)
        value, grads = inner(*args, **kw)
        loss, aux = value if has_aux else (value, None)
        _, aux, grads = _mark_outputs(loss, aux, grads)  # the loss classifies the gradients
        return (grads, aux) if has_aux else grads

    return wrapped
