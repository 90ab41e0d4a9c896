"""Tracing: a function and example arguments -> a closed jaxpr plus everything needed to call it.

Input: ``fun``, example args (arrays or ``jax.ShapeDtypeStruct``s), ``static_argnums``,
``batch_argnums``. Output: `TracedFunction` (closed jaxpr over the flattened dynamic leaves,
their pytree structure, key paths, and which leaves are batch leaves). No analysis here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jcore

from alpa_lite.errors import InvalidConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class TracedFunction:
    """A function traced over its flattened dynamic arguments.

    Attributes:
        closed_jaxpr: the jaxpr over ``len(in_avals)`` flat inputs.
        in_tree: treedef of the tuple of dynamic (non-static) arguments.
        out_tree: treedef of the result.
        in_avals: abstract value of each flat input.
        in_paths: a readable key path per flat input, e.g. ``"state.params['dense_0']['kernel']"``.
        in_argnums: which positional argument each flat input came from.
        batch_leaves: per flat input, whether it belongs to a batch argument.
        static_args: positional index -> value for static arguments.
    """

    closed_jaxpr: jcore.ClosedJaxpr
    in_tree: Any
    out_tree: Any
    in_avals: tuple
    in_paths: tuple[str, ...]
    in_argnums: tuple[int, ...]
    batch_leaves: tuple[bool, ...]
    static_args: dict


def abstractify(x) -> jax.ShapeDtypeStruct:
    """Shape, dtype and weak type of an argument as `jax.jit` sees it, without its data.

    Python scalars are weakly typed (as under `jax.jit`), so a step traced on a state whose
    ``step`` counter is a Python int keeps it weak, and calling the step again on its own
    output neither re-plans nor recompiles.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type)
    try:
        aval = jax.typeof(x)
    except TypeError:
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def abstract_signature(args: Sequence, static_argnums: Sequence[int]) -> tuple:
    """What a plan depends on: pytree structure, (shape, dtype) per leaf, static values.

    Weak types are left out: they do not change a plan.
    """
    dynamic, static, _ = split_static_args(args, static_argnums)
    leaves, tree = jax.tree_util.tree_flatten(tuple(dynamic))
    return tree, leaf_signature(leaves), tuple(sorted(static.items(), key=lambda kv: kv[0]))


def leaf_signature(leaves: Sequence) -> tuple:
    """(shape, dtype) of each leaf: the part of `abstract_signature` that leaves decide."""
    return tuple((tuple(a.shape), a.dtype) for a in map(abstractify, leaves))


def split_static_args(args: Sequence, static_argnums: Sequence[int]):
    """Returns (dynamic args tuple, {index: static value}, dynamic positional indices)."""
    num_args = len(args)
    for i in static_argnums:
        if not -num_args <= i < num_args:
            raise InvalidConfigError(
                f"static_argnums contains {i} but the function was called with {num_args} "
                "positional arguments. Use indices below the number of arguments."
            )
    static = {i % num_args: args[i] for i in static_argnums}
    dyn_idx = tuple(i for i in range(num_args) if i not in static)
    return tuple(args[i] for i in dyn_idx), static, dyn_idx


def rebuild_args(dynamic_args: Sequence, static_args: dict, dyn_idx: Sequence[int]) -> list:
    """Inverse of `split_static_args`."""
    args = [None] * (len(dynamic_args) + len(static_args))
    for i, v in static_args.items():
        args[i] = v
    for i, v in zip(dyn_idx, dynamic_args):
        args[i] = v
    return args


def trace_function(
    fun: Callable,
    args: Sequence,
    *,
    static_argnums: Sequence[int] = (),
    batch_argnums: Sequence[int] = (),
    batch_leaves: Sequence[bool] | None = None,
) -> TracedFunction:
    """Traces ``fun(*args)`` to a closed jaxpr over the flattened dynamic arguments.

    ``batch_leaves`` (per flat dynamic leaf) overrides the default "every leaf of a
    ``batch_argnums`` argument".

    Example:
        >>> import jax, jax.numpy as jnp
        >>> t = trace_function(lambda a, b: a @ b, (jnp.ones((2, 3)), jnp.ones((3, 4))))
        >>> [str(a.shape) for a in t.in_avals], len(t.closed_jaxpr.eqns)
        (['(2, 3)', '(3, 4)'], 1)
    """
    dynamic_args, static_args, dyn_idx = split_static_args(args, static_argnums)
    leaves_with_paths, in_tree = jax.tree_util.tree_flatten_with_path(tuple(dynamic_args))
    avals = tuple(abstractify(leaf) for _, leaf in leaves_with_paths)
    in_argnums = tuple(dyn_idx[path[0].idx] for path, _ in leaves_with_paths)
    in_paths = tuple(_path_name(path, dyn_idx) for path, _ in leaves_with_paths)
    if batch_leaves is None:
        batch_set = {i % max(len(args), 1) for i in batch_argnums}
        batch_leaves = tuple(argnum in batch_set for argnum in in_argnums)

    def flat_fun(*flat_args):
        dyn = jax.tree_util.tree_unflatten(in_tree, flat_args)
        return fun(*rebuild_args(dyn, static_args, dyn_idx))

    closed_jaxpr, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*avals)
    out_tree = jax.tree_util.tree_structure(out_shape)
    return TracedFunction(
        closed_jaxpr=closed_jaxpr,
        in_tree=in_tree,
        out_tree=out_tree,
        in_avals=tuple(v.aval for v in closed_jaxpr.jaxpr.invars),
        in_paths=in_paths,
        in_argnums=in_argnums,
        batch_leaves=tuple(batch_leaves),
        static_args=static_args,
    )


def _path_name(path, dyn_idx) -> str:
    head = f"arg{dyn_idx[path[0].idx]}"
    return head + jax.tree_util.keystr(path[1:])
