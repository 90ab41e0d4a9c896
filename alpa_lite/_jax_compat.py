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


def scan_operand_counts(params: dict) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a ``scan`` equation, whose operands are consts, then the
    carry, then the scanned-over xs (and whose results are the carry, then the ys).

    jax <= 0.11 names the counts in the params; jax 0.12 keeps a flat tree of the operands
    (``ft_in``) instead, whose three parts are those groups.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(list(consts.vals)), len(list(carry.vals))


def while_operand_counts(params: dict) -> tuple[int, int]:
    """``(cond_nconsts, body_nconsts)`` of a ``while`` equation, whose operands are the
    condition's consts, the body's consts, then the carry (the same on every jax here)."""
    return params["cond_nconsts"], params["body_nconsts"]


def batched_elementwise(primitive) -> bool:
    """Does jax batch ``primitive`` as an elementwise operator?

    jax registers the vmap rule of every elementwise primitive in `jax.lax` through one of two
    generic batchers (``defvectorized`` for unary, ``defbroadcasting`` for n-ary operators),
    so this tells a new elementwise primitive (e.g. jax 0.12's ``one_minus_square``) from one
    that couples elements, without a hand-kept list. RNG key primitives are batched the same
    way but change shapes; callers exclude them.
    """
    from jax._src.interpreters import batching

    table = getattr(batching, "fancy_primitive_batchers", None)
    if table is None:
        table = batching.primitive_batchers
    rule = table.get(primitive)
    func = getattr(rule, "func", None)  # both generic batchers are functools.partials
    return func in (getattr(batching, "vectorized_batcher", None),
                    getattr(batching, "broadcast_batcher", None)) and func is not None


def source_line(source_info) -> str:
    """The user's line an equation came from, as jax prints it (``file.py:12:4 (fn)``);
    ``""`` when unknown."""
    if source_info is None:
        return ""
    from jax._src import source_info_util

    try:
        return source_info_util.summarize(source_info)
    except Exception:  # a source_info layout this jax does not summarize
        return ""


@functools.cache
def tile_primitive():
    """The primitive behind `jnp.tile` (jax exports none), or None where it lowers to others."""
    jaxpr = jax.make_jaxpr(lambda x: jnp.tile(x, (2, 1)))(jax.ShapeDtypeStruct((1, 2), jnp.float32))
    eqns = jaxpr.eqns
    return eqns[0].primitive if len(eqns) == 1 and eqns[0].primitive.name == "tile" else None


def equation_context(eqn):
    """A context in which re-binding ``eqn``'s primitive keeps its source line and name stack
    (the user's line in error messages, module names for layer construction)."""
    from jax._src import source_info_util

    return source_info_util.user_context(eqn.source_info.traceback,
                                         name_stack=eqn.source_info.name_stack)


def without_mesh_context():
    """A context with no mesh set (`jax.set_mesh(None)`): our programs run on the plan's own
    meshes, whatever mesh (an explicit-sharding one, say) the caller has set."""
    return jax.set_mesh(None)


@functools.cache
def reshard_primitive():
    """The primitive behind `jax.sharding.reshard` (found by tracing under a 1-device
    explicit abstract mesh), or None on a jax without explicit sharding."""
    try:
        from jax.sharding import AbstractMesh, AxisType, PartitionSpec

        mesh = AbstractMesh((1,), ("a",), axis_types=(AxisType.Explicit,))
        with without_mesh_context(), jax.sharding.use_abstract_mesh(mesh):
            jaxpr = jax.make_jaxpr(lambda x: jax.sharding.reshard(x, PartitionSpec("a")))(
                jax.ShapeDtypeStruct((2,), jnp.float32))
    except (AttributeError, ImportError, TypeError):
        return None
    return jaxpr.eqns[0].primitive if jaxpr.eqns else None


def is_explicit_sharding(value) -> bool:
    """Is ``value`` a sharding on a mesh with an explicit axis (`jax.sharding.AxisType`)?"""
    mesh = getattr(value, "mesh", None)
    axis_types = getattr(mesh, "axis_types", ()) or ()
    return any(getattr(t, "name", str(t)) == "Explicit" for t in axis_types)


@functools.cache
def stack_primitives() -> tuple:
    """The primitives behind `jnp.stack` and `jnp.unstack` where jax has their own
    (``stack``, ``unstack``; found by tracing), else an empty tuple."""
    x = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    found = []
    for fn in (lambda a: jnp.stack([a, a]), lambda a: jnp.unstack(a, axis=0)):
        try:
            eqns = jax.make_jaxpr(fn)(x).eqns
        except AttributeError:  # no jnp.unstack
            return ()
        if len(eqns) != 1 or eqns[0].primitive.name not in ("stack", "unstack"):
            return ()
        found.append(eqns[0].primitive)
    return tuple(found)
