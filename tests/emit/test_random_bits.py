import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from alpa_lite.emit.random_bits import (
    _micro_batch_counters,
    distinct_micro_batch_bits,
    is_sliceable,
    micro_batch_random_bits,
)
from alpa_lite.errors import InvalidConfigError, UnsupportedPrimitiveError

_DTYPES = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}

_KEYS = {
    "key": lambda: jax.random.key(0),
    "split": lambda: jax.random.split(jax.random.key(1), 3)[2],
    "fold_in": lambda: jax.random.fold_in(jax.random.key(2), 7),
    "raw": lambda: jax.random.PRNGKey(3),
}


def _full_shape(micro_shape, dim, k):
    return tuple(size * k if j == dim else size for j, size in enumerate(micro_shape))


def _assert_all_slices_match(key, bit_width, micro_shape, dim, k):
    full = jax.random.bits(key, _full_shape(micro_shape, dim, k), _DTYPES[bit_width])
    for i in range(k):
        part = micro_batch_random_bits(
            key, bit_width=bit_width, micro_shape=micro_shape, dim=dim,
            num_micro_batches=k, micro_batch_index=i,
        )
        assert part.dtype == full.dtype
        expected = jax.lax.slice_in_dim(full, i, full.shape[dim], k, axis=dim)
        np.testing.assert_array_equal(part, expected, err_msg=f"micro-batch {i} of {k}")


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("bit_width", [8, 16, 32])
def test_slice_equals_full_bits_dim0(bit_width, k):
    _assert_all_slices_match(jax.random.key(0), bit_width, (8, 3, 5), 0, k)


@pytest.mark.parametrize("key_name", sorted(_KEYS))
def test_slice_equals_full_bits_for_split_folded_and_raw_keys(key_name):
    _assert_all_slices_match(_KEYS[key_name](), 32, (8, 3, 5), 0, 4)


def test_slice_equals_full_bits_64bit_with_x64():
    with jax.enable_x64(True):
        _assert_all_slices_match(jax.random.key(0), 64, (8, 3, 5), 0, 4)
        _assert_all_slices_match(jax.random.PRNGKey(5), 64, (3, 8, 5), 1, 2)


def test_64bit_without_x64_is_a_clear_error():
    with pytest.raises(InvalidConfigError, match="jax_enable_x64"):
        micro_batch_random_bits(jax.random.key(0), bit_width=64, micro_shape=(2,), dim=0,
                                num_micro_batches=2, micro_batch_index=0)


def test_slice_equals_full_bits_dim1():
    _assert_all_slices_match(jax.random.key(4), 16, (3, 8, 5), 1, 4)


@pytest.mark.parametrize(
    ("micro_shape", "dim", "k"), [((5, 3, 7), 0, 3), ((3, 7, 5), 2, 3), ((7,), 0, 5)]
)
def test_slice_equals_full_bits_odd_sizes(micro_shape, dim, k):
    _assert_all_slices_match(jax.random.key(6), 32, micro_shape, dim, k)


def test_jit_with_traced_index_and_key():
    k, micro_shape = 4, (8, 3, 5)
    key = jax.random.key(0)
    sliced = jax.jit(functools.partial(micro_batch_random_bits, bit_width=32,
                                       micro_shape=micro_shape, dim=0, num_micro_batches=k))
    full = jax.random.bits(key, _full_shape(micro_shape, 0, k), jnp.uint32)
    for i in range(k):
        np.testing.assert_array_equal(sliced(key, micro_batch_index=jnp.int32(i)), full[i::k])


def test_scan_over_micro_batches():
    k, micro_shape = 4, (8, 3, 5)
    key = jax.random.fold_in(jax.random.key(0), 3)

    def body(carry, index):
        bits = micro_batch_random_bits(carry, bit_width=16, micro_shape=micro_shape, dim=0,
                                       num_micro_batches=k, micro_batch_index=index)
        return carry, bits

    _, stacked = jax.jit(lambda key: jax.lax.scan(body, key, jnp.arange(k)))(key)
    full = jax.random.bits(key, _full_shape(micro_shape, 0, k), jnp.uint16)
    for i in range(k):
        np.testing.assert_array_equal(stacked[i], full[i::k])


@functools.cache
def _random_bits_primitive():
    jaxpr = jax.make_jaxpr(lambda key: jax.random.bits(key, (1,)))(jax.random.key(0))
    return jaxpr.eqns[-1].primitive


def _eval_with_sliced_bits(jaxpr, consts, args, *, dim, k, index):
    """Evaluates ``jaxpr``, replacing each random_bits by its micro-batch slice."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))

    def read(var):
        return var.val if isinstance(var, jcore.Literal) else env[var]

    for eqn in jaxpr.eqns:
        invals = [read(var) for var in eqn.invars]
        if eqn.primitive is _random_bits_primitive():
            outvals = [micro_batch_random_bits(
                invals[0], bit_width=eqn.params["bit_width"], micro_shape=eqn.params["shape"],
                dim=dim, num_micro_batches=k, micro_batch_index=index)]
        elif eqn.primitive is prims.jit_p:
            inner = eqn.params["jaxpr"]
            outvals = _eval_with_sliced_bits(inner.jaxpr, inner.consts, invals,
                                             dim=dim, k=k, index=index)
        else:
            outvals = eqn.primitive.bind(*invals, **eqn.params)
            outvals = outvals if eqn.primitive.multiple_results else [outvals]
        env.update(zip(eqn.outvars, outvals))
    return [read(var) for var in jaxpr.outvars]


@pytest.mark.parametrize("sampler", ["bernoulli", "uniform"])
def test_dropout_style_sampling_on_slice_equals_serial_slice(sampler):
    k, micro_shape = 4, (8, 3, 5)
    key = jax.random.key(0)
    draw = {
        "bernoulli": lambda key, shape: jax.random.bernoulli(key, 0.3, shape),
        "uniform": lambda key, shape: jax.random.uniform(key, shape),
    }[sampler]
    serial = draw(key, _full_shape(micro_shape, 0, k))
    closed = jax.make_jaxpr(lambda key: draw(key, micro_shape))(key)
    for i in range(k):
        (micro,) = _eval_with_sliced_bits(closed.jaxpr, closed.consts, [key], dim=0, k=k, index=i)
        np.testing.assert_array_equal(micro, serial[i::k])


def _iter_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            if isinstance(param, jcore.ClosedJaxpr):
                yield from _iter_eqns(param.jaxpr)
            elif isinstance(param, jcore.Jaxpr):
                yield from _iter_eqns(param)


def test_jaxpr_has_no_full_size_array():
    k, micro_shape = 4, (8, 3, 5)
    jaxpr = jax.make_jaxpr(functools.partial(
        micro_batch_random_bits, bit_width=32, micro_shape=micro_shape, dim=0,
        num_micro_batches=k))(jax.random.key(0), micro_batch_index=jnp.int32(1))
    sizes = [(eqn.primitive.name, var.aval.shape) for eqn in _iter_eqns(jaxpr.jaxpr)
             for var in eqn.outvars]
    too_big = [(name, shape) for name, shape in sizes if math.prod(shape) > math.prod(micro_shape)]
    assert not too_big, f"arrays larger than one micro-batch {micro_shape}: {too_big}"
    assert any(shape == micro_shape for _, shape in sizes)


@pytest.mark.parametrize(("micro_shape", "dim", "k", "index"), [
    ((1, 2**7, 2**10), 0, 2**20, 2**20 - 1),  # counters above 2**32
    ((3, 7, 5), 2, 2**31 - 1, 2**31 - 2),  # strides above 2**32
    ((4, 3, 5), 1, 6, 5),
])
def test_counters_are_64bit_linear_indices(micro_shape, dim, k, index):
    hi, lo = jax.jit(lambda i: _micro_batch_counters(micro_shape, dim, k, i))(jnp.uint32(index))
    counters = np.asarray(hi).astype(object) * 2**32 + np.asarray(lo).astype(object)
    full_shape = _full_shape(micro_shape, dim, k)
    strides = [math.prod(full_shape[j + 1:]) for j in range(len(full_shape))]
    positions = np.indices(micro_shape).astype(object)
    positions[dim] = positions[dim] * k + index
    expected = sum(positions[j] * strides[j] for j in range(len(micro_shape)))
    np.testing.assert_array_equal(counters, expected)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_other_prng_impls_are_unsupported(impl):
    key = jax.random.key(0, impl=impl)
    assert not is_sliceable(key)
    with pytest.raises(UnsupportedPrimitiveError, match=f"'{impl}'.*distinct_micro_batch_bits"):
        micro_batch_random_bits(key, bit_width=32, micro_shape=(4, 2), dim=0,
                                num_micro_batches=2, micro_batch_index=0)


def test_non_partitionable_threefry_is_unsupported():
    key = jax.random.key(0)
    with jax.threefry_partitionable(False):
        assert not is_sliceable(key)
        with pytest.raises(UnsupportedPrimitiveError, match="jax_threefry_partitionable"):
            micro_batch_random_bits(key, bit_width=32, micro_shape=(4, 2), dim=0,
                                    num_micro_batches=2, micro_batch_index=0)


def test_batched_keys_are_unsupported():
    keys = jax.random.split(jax.random.key(0), 2)
    assert not is_sliceable(keys)
    with pytest.raises(UnsupportedPrimitiveError, match=r"shape \(2,\)"):
        micro_batch_random_bits(keys, bit_width=32, micro_shape=(4, 2), dim=0,
                                num_micro_batches=2, micro_batch_index=0)


@pytest.mark.parametrize(("micro_shape", "match"), [
    ((2**30, 2**30, 2**30), r"more than jax's 2\*\*64"),
    ((2**32, 3), r"reaches 2\*\*32"),
])
def test_too_large_shapes_are_unsupported(micro_shape, match):
    key = jax.random.key(0)
    assert not is_sliceable(key, micro_shape=micro_shape, num_micro_batches=2)
    with pytest.raises(UnsupportedPrimitiveError, match=match):
        micro_batch_random_bits(key, bit_width=32, micro_shape=micro_shape, dim=0,
                                num_micro_batches=2, micro_batch_index=0)


def test_too_many_micro_batches_are_unsupported():
    assert not is_sliceable(jax.random.key(0), micro_shape=(1,), num_micro_batches=2**32)


def test_threefry_keys_are_sliceable():
    for make_key in _KEYS.values():
        assert is_sliceable(make_key(), micro_shape=(8, 3, 5), num_micro_batches=4)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"dim": 3}, "dim=3"),
    ({"num_micro_batches": 0}, "num_micro_batches"),
    ({"micro_batch_index": 4}, "micro_batch_index=4"),
    ({"bit_width": 12}, "bit_width"),
])
def test_invalid_arguments_are_clear_errors(kwargs, match):
    args = dict(bit_width=32, micro_shape=(4, 2), dim=0, num_micro_batches=4, micro_batch_index=0)
    with pytest.raises(InvalidConfigError, match=match):
        micro_batch_random_bits(jax.random.key(0), **args | kwargs)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_fallback_streams_differ_per_micro_batch(impl):
    key = jax.random.key(0, impl=impl)
    draw = jax.jit(functools.partial(distinct_micro_batch_bits, bit_width=8, micro_shape=(8, 3, 5)))
    streams = [np.asarray(draw(key, micro_batch_index=jnp.int32(i))) for i in range(4)]
    for i in range(4):
        assert streams[i].dtype == np.uint8 and streams[i].shape == (8, 3, 5)
        for j in range(i):
            assert (streams[i] != streams[j]).any(), f"micro-batches {j} and {i} share a stream"
    np.testing.assert_array_equal(draw(key, micro_batch_index=jnp.int32(2)), streams[2])
