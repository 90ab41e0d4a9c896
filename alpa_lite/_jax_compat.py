"""The one module that reaches for jax internals or version-dependent APIs.

Everything here has a public fallback or fails with a clear message, so a JAX upgrade breaks
this file, not the package.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.cache
def optimization_barrier_primitive():
    """The primitive behind `jax.lax.optimization_barrier` (found by tracing, not by import)."""
    jaxpr = jax.make_jaxpr(jax.lax.optimization_barrier)(jax.ShapeDtypeStruct((), jnp.float32))
    return jaxpr.eqns[0].primitive


def bind_params(eqn_primitive, params: dict) -> dict:
    """Params to pass to ``primitive.bind`` for an equation's params (jax >= 0.4.36: one dict)."""
    result = eqn_primitive.get_bind_params(params)
    if isinstance(result, tuple):  # older jax: (subfuns, params)
        subfuns, bparams = result
        if subfuns:
            raise NotImplementedError(f"Cannot re-bind {eqn_primitive.name} with subfuns on this jax.")
        return bparams
    return result


@functools.cache
def split_primitive():
    """The primitive behind `jax.lax.split`, or None on jax versions without one."""
    if not hasattr(jax.lax, "split"):
        return None
    jaxpr = jax.make_jaxpr(lambda x: jax.lax.split(x, (1, 1)))(jax.ShapeDtypeStruct((2,), jnp.float32))
    return jaxpr.eqns[0].primitive


@functools.cache
def key_wrapping_primitives() -> tuple:
    """The primitives behind `jax.random.wrap_key_data` and `jax.random.key_data` (found by
    tracing: jax exports neither)."""
    wrap = jax.make_jaxpr(jax.random.wrap_key_data)(jax.ShapeDtypeStruct((2,), jnp.uint32))
    key = jax.eval_shape(lambda: jax.random.key(0))
    unwrap = jax.make_jaxpr(jax.random.key_data)(key)
    return wrap.eqns[0].primitive, unwrap.eqns[0].primitive


def key_impl_of_dtype(dtype):
    """The PRNG implementation of a key dtype (``key<fry>``), for `jax.random.wrap_key_data`.

    jax exposes it only on key arrays (`jax.random.key_impl`); abstract values need the
    dtype's private attribute.
    """
    impl = getattr(dtype, "_impl", None)
    if impl is None:
        raise NotImplementedError(f"Cannot find the PRNG implementation of {dtype} on this jax.")
    return impl


def backend_started() -> bool:
    """Has jax's backend started in this process (too late for `jax.distributed`)?"""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def distributed_state():
    """jax's `jax.distributed` state: ``process_id``, ``num_processes``,
    ``coordinator_address`` and the coordination ``client`` (its key-value store)."""
    from jax._src import distributed

    return distributed.global_state


def detected_cluster() -> str | None:
    """The name of the cluster environment jax would detect here (``"slurm"``, ``"ompi"``,
    ...), skipping opt-in detectors; None when there is none."""
    from jax._src import clusters

    for cluster in clusters.ClusterEnv._cluster_types:
        if getattr(cluster, "opt_in_only_method", False):
            continue
        try:
            present = cluster.is_env_present()
        except Exception:  # a detector that cannot run here (no metadata server, ...)
            present = False
        if present:
            return getattr(cluster, "name", cluster.__name__)
    return None
