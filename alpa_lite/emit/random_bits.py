"""One micro-batch's slice of a full-batch random stream, computed without the full batch.

Input: a PRNG key, the micro-batch shape, the batch dim ``d``, the number of micro-batches ``k``
and the (possibly traced) micro-batch index ``i``. Output: the bits that
``random_bits(key, bit_width, full_shape)`` gives at ``[i::k]`` along ``d``, where ``full_shape``
is the micro shape with dim ``d`` multiplied by ``k`` (alpa_lite's strided micro-batch split).

With ``jax_threefry_partitionable=True`` (the default since jax 0.5) the threefry2x32 stream is
counter based: element ``n`` (row-major linear index in the full shape) gets
``(w1, w2) = threefry2x32(key, (n >> 32, n & 0xFFFFFFFF))`` and its bits are ``w1 << 32 | w2``
(64-bit), ``w1 ^ w2`` (32-bit) or the low 8/16 bits of ``w1 ^ w2``. So the slice is threefry on
the counters of the selected elements only: memory and compute are those of one micro-batch.
Other PRNGs (rbg, unsafe_rbg) and the non-partitionable threefry stream have no such
per-element formula; `distinct_micro_batch_bits` is the documented fallback for them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from jax import lax

from alpa_lite.errors import InvalidConfigError, UnsupportedPrimitiveError

_BIT_WIDTHS = (8, 16, 32, 64)
_UINT_DTYPES = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}
_WORD = 2**32
_HALF_WORD_MASK = np.uint32(0xFFFF)
# jax's partitionable threefry raises for more than 2**64 elements: the counter is 64 bits.
_MAX_FULL_SIZE = 2**64
_SLICEABLE_IMPL = "threefry2x32"


def micro_batch_random_bits(
    key: jax.Array,
    *,
    bit_width: int,
    micro_shape: tuple[int, ...],
    dim: int,
    num_micro_batches: int,
    micro_batch_index: int | jax.Array,
) -> jax.Array:
    """Micro-batch ``i``'s slice ``[i::k]`` along ``dim`` of the full-batch random bits.

    With ``F = full_shape``, ``F[dim] = k * micro_shape[dim]``, and row-major strides
    ``s_j = prod(F[j+1:])``, the micro element at multi-index ``m`` is the full element at
    ``f_j = m_j`` for ``j != dim`` and ``f_dim = k * m_dim + i``, whose counter is
    ``n = sum_j f_j * s_j`` (a 64-bit integer carried as two uint32 words ``(hi, lo)``).
    Threefry2x32 is evaluated on exactly these counters.

    Args:
        key: a typed PRNG key of shape ``()`` (e.g. from `jax.random.key`, `jax.random.split`,
            `jax.random.fold_in`) or a raw ``uint32[2]`` key (read with the default PRNG
            implementation, as `jax.random.bits` does).
        bit_width: 8, 16, 32 or 64 (64 needs ``jax_enable_x64``, as ``random_bits`` does).
        micro_shape: the shape of one micro-batch's bits.
        dim: the batch dim that is split into micro-batches.
        num_micro_batches: ``k``.
        micro_batch_index: ``i`` in ``[0, k)``; a Python int or a traced integer scalar (a
            `jax.lax.scan` index). A traced index is not range-checked.

    Returns:
        An array of shape ``micro_shape`` and dtype ``uint{bit_width}``, bit-for-bit equal to
        ``random_bits(key, bit_width, full_shape)`` sliced ``[i::k]`` along ``dim``.

    Raises:
        UnsupportedPrimitiveError: the stream cannot be sliced exactly (see `is_sliceable`).
        InvalidConfigError: bad ``bit_width``, ``dim``, ``num_micro_batches`` or index.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> key = jax.random.key(0)
        >>> part = micro_batch_random_bits(key, bit_width=32, micro_shape=(2, 3), dim=0,
        ...                                num_micro_batches=2, micro_batch_index=1)
        >>> full = jax.random.bits(key, (4, 3), jnp.uint32)
        >>> bool((part == full[1::2]).all())
        True
    """
    full_shape = _full_shape(micro_shape, dim, num_micro_batches)
    _check_bit_width(bit_width)
    _check_index(micro_batch_index, num_micro_batches)
    typed_key = _typed_key(key)
    reason = _unsliceable_reason(typed_key, tuple(micro_shape), num_micro_batches)
    if reason is not None:
        raise UnsupportedPrimitiveError(
            f"Cannot compute micro-batch {micro_batch_index!r} of {num_micro_batches} of "
            f"random_bits with shape {full_shape} exactly: {reason}. Use "
            "distinct_micro_batch_bits for a per-micro-batch stream instead (it differs "
            "from the serial one), or run without micro-batching."
        )
    return _sliced_threefry_bits(
        jax.random.key_data(typed_key),
        lax.convert_element_type(micro_batch_index, jnp.uint32),
        bit_width=bit_width,
        micro_shape=tuple(micro_shape),
        dim=dim,
        num_micro_batches=num_micro_batches,
    )


# One compiled unit for eager calls (dozens of tiny uint32 ops otherwise dispatch one by one);
# inline=True keeps the caller's jaxpr flat when traced inside a jit or scan.
@functools.partial(
    jax.jit, static_argnames=("bit_width", "micro_shape", "dim", "num_micro_batches"), inline=True
)
def _sliced_threefry_bits(
    key_words: jax.Array,
    index: jax.Array,
    *,
    bit_width: int,
    micro_shape: tuple[int, ...],
    dim: int,
    num_micro_batches: int,
) -> jax.Array:
    """Threefry2x32 of ``key_words`` on the micro-batch counters, combined to ``bit_width``."""
    counter_hi, counter_lo = _micro_batch_counters(micro_shape, dim, num_micro_batches, index)
    word1, word2 = jex_random.threefry2x32_p.bind(
        key_words[0], key_words[1], counter_hi, counter_lo
    )
    return _combine_words(word1, word2, bit_width)


def is_sliceable(
    key: jax.Array, *, micro_shape: tuple[int, ...] = (), num_micro_batches: int = 1
) -> bool:
    """Whether `micro_batch_random_bits` can slice ``key``'s stream exactly.

    True iff the key is a single (shape ``()``) threefry2x32 key, the config flag
    ``jax_threefry_partitionable`` is on (read now, i.e. at trace time), the full shape has at
    most ``2**64`` elements (jax's own bound for its 64-bit counter), and every micro-batch dim
    and ``num_micro_batches`` are below ``2**32`` (each index is one uint32).

    Args:
        key: a typed key or a raw ``uint32`` key, concrete or traced.
        micro_shape: the shape of one micro-batch's bits; ``()`` checks the key alone.
        num_micro_batches: ``k``.

    Returns:
        Whether the exact slice is available.

    Example:
        >>> import jax
        >>> is_sliceable(jax.random.key(0), micro_shape=(8, 4), num_micro_batches=2)
        True
        >>> is_sliceable(jax.random.key(0, impl="rbg"))
        False
    """
    return _unsliceable_reason(_typed_key(key), tuple(micro_shape), num_micro_batches) is None


def distinct_micro_batch_bits(
    key: jax.Array,
    *,
    bit_width: int,
    micro_shape: tuple[int, ...],
    micro_batch_index: int | jax.Array,
) -> jax.Array:
    """Fallback stream: ``random_bits(fold_in(key, i), bit_width, micro_shape)``.

    Works for every PRNG implementation. Each micro-batch gets its own stream (never the same
    mask for every micro-batch), but the concatenated micro-batches do NOT equal the serial
    full-batch bits, so micro-batched results differ from serial `jax.jit` in their random
    draws (same distribution, different samples).

    Args:
        key: a typed or raw PRNG key of shape ``()`` (typed) or ``(key_size,)`` (raw).
        bit_width: 8, 16, 32 or 64.
        micro_shape: the shape of one micro-batch's bits.
        micro_batch_index: the micro-batch index; a Python int or a traced integer scalar.

    Returns:
        An array of shape ``micro_shape`` and dtype ``uint{bit_width}``.

    Example:
        >>> import jax
        >>> key = jax.random.key(0, impl="rbg")
        >>> first = distinct_micro_batch_bits(key, bit_width=8, micro_shape=(4, 4),
        ...                                   micro_batch_index=0)
        >>> second = distinct_micro_batch_bits(key, bit_width=8, micro_shape=(4, 4),
        ...                                    micro_batch_index=1)
        >>> bool((first != second).any())
        True
    """
    _check_bit_width(bit_width)
    micro_key = jax.random.fold_in(key, micro_batch_index)
    return jax.random.bits(micro_key, tuple(micro_shape), _UINT_DTYPES[bit_width])


def _full_shape(micro_shape: tuple[int, ...], dim: int, num_micro_batches: int) -> tuple[int, ...]:
    """``micro_shape`` with dim ``dim`` multiplied by ``num_micro_batches``."""
    micro_shape = tuple(int(size) for size in micro_shape)
    if not 0 <= dim < len(micro_shape):
        raise InvalidConfigError(
            f"dim={dim} is not a dim of micro_shape={micro_shape}; use one of "
            f"{list(range(len(micro_shape)))}."
        )
    if not (isinstance(num_micro_batches, int) and num_micro_batches >= 1):
        raise InvalidConfigError(
            f"num_micro_batches must be a positive Python int, got {num_micro_batches!r}."
        )
    full = list(micro_shape)
    full[dim] *= num_micro_batches
    return tuple(full)


def _check_bit_width(bit_width: int) -> None:
    if bit_width not in _BIT_WIDTHS:
        raise InvalidConfigError(
            f"bit_width must be one of {list(_BIT_WIDTHS)}, got {bit_width!r}."
        )
    # Without x64 jax.random.bits already narrows a uint64 request to 32 bits, so a
    # random_bits equation of width 64 only exists with x64 on; uint64 cannot be built without it.
    if bit_width == 64 and not jax.config.jax_enable_x64:
        raise InvalidConfigError(
            "bit_width=64 needs uint64 arrays, which jax only has with jax_enable_x64 on. Enable "
            "it (jax.config.update('jax_enable_x64', True) or `with jax.enable_x64(True):`), "
            "or ask for 32 bits."
        )


def _check_index(micro_batch_index: int | jax.Array, num_micro_batches: int) -> None:
    """Range-checks a concrete Python index; a traced one cannot be checked at trace time."""
    if isinstance(micro_batch_index, (int, np.integer)) and not (
        0 <= micro_batch_index < num_micro_batches
    ):
        raise InvalidConfigError(
            f"micro_batch_index={micro_batch_index} is outside [0, {num_micro_batches}); use an "
            f"index in 0..{num_micro_batches - 1}."
        )


def _typed_key(key: jax.Array) -> jax.Array:
    """``key`` as a typed key; a raw key is wrapped with the default impl, as jax.random does."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _unsliceable_reason(
    typed_key: jax.Array, micro_shape: tuple[int, ...], num_micro_batches: int
) -> str | None:
    """Why the exact slice is unavailable, or None when it is available."""
    full_size = math.prod(micro_shape) * num_micro_batches
    impl = str(jax.random.key_impl(typed_key))
    if impl != _SLICEABLE_IMPL:
        return (
            f"the key's PRNG implementation is {impl!r}, and only {_SLICEABLE_IMPL!r} has "
            "bits that depend on the element index alone"
        )
    if not jax.config.jax_threefry_partitionable:
        return (
            "jax_threefry_partitionable is False, so element bits depend on the whole shape; "
            "set jax.config.update('jax_threefry_partitionable', True)"
        )
    if typed_key.shape != ():
        return f"the key array has shape {typed_key.shape}, expected a single key of shape ()"
    if full_size > _MAX_FULL_SIZE:
        return (
            f"the full shape has {full_size} elements, more than jax's 2**64 "
            "limit for threefry counters"
        )
    if any(size >= _WORD for size in micro_shape) or num_micro_batches >= _WORD:
        return (
            f"micro_shape {micro_shape} or num_micro_batches={num_micro_batches} reaches 2**32; "
            "each micro-batch dim index and the micro-batch index must fit in uint32"
        )
    return None


def _micro_batch_counters(
    micro_shape: tuple[int, ...], dim: int, num_micro_batches: int, index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The 64-bit counters ``n = sum_j f_j * s_j`` of the micro elements, as ``(hi, lo)``.

    Each term ``f_j * s_j`` is computed on a 1-D vector of length ``micro_shape[j]`` (or on the
    scalar index) and only then broadcast, so the work on the full micro shape is one 64-bit add
    per dim.
    """
    full_shape = _full_shape(micro_shape, dim, num_micro_batches)
    strides = [math.prod(full_shape[j + 1 :]) for j in range(len(full_shape))]
    # f_dim * s_dim = m_dim * (k * s_dim) + i * s_dim: splitting it keeps every uint32 factor
    # below 2**32 even when full_shape[dim] is not.
    counter_hi, counter_lo = _multiply_wide(index, strides[dim])
    counter_hi = jnp.broadcast_to(counter_hi, micro_shape)
    counter_lo = jnp.broadcast_to(counter_lo, micro_shape)
    for j, size in enumerate(micro_shape):
        factor = strides[j] * num_micro_batches if j == dim else strides[j]
        term_hi, term_lo = _multiply_wide(lax.iota(jnp.uint32, size), factor)
        counter_hi, counter_lo = _add_wide(
            (counter_hi, counter_lo),
            (
                lax.broadcast_in_dim(term_hi, micro_shape, (j,)),
                lax.broadcast_in_dim(term_lo, micro_shape, (j,)),
            ),
        )
    return counter_hi, counter_lo


def _multiply_wide(values: jax.Array, factor: int) -> tuple[jax.Array, jax.Array]:
    """``values * factor mod 2**64`` as ``(hi, lo)`` uint32 words, for uint32 ``values``.

    jax has no 32x32->64 multiply without x64, so the high word of ``values * factor_lo`` is
    rebuilt from 16-bit halves: with ``v = v1 2^16 + v0`` and ``c = c1 2^16 + c0``,
    ``hi = v1 c1 + (v0 c1 >> 16) + (v1 c0 >> 16) + carry`` where
    ``carry = ((v0 c0 >> 16) + (v0 c1 & 0xFFFF) + (v1 c0 & 0xFFFF)) >> 16``.
    ``factor_hi`` only reaches the high word (its product's high part is beyond 2**64).
    """
    factor_lo = np.uint32(factor % _WORD)
    factor_hi = np.uint32((factor // _WORD) % _WORD)
    value_low, value_high = values & _HALF_WORD_MASK, values >> np.uint32(16)
    factor_low, factor_high = factor_lo & _HALF_WORD_MASK, factor_lo >> np.uint32(16)
    low_low = value_low * factor_low
    low_high = value_low * factor_high
    high_low = value_high * factor_low
    carry = (
        (low_low >> np.uint32(16)) + (low_high & _HALF_WORD_MASK) + (high_low & _HALF_WORD_MASK)
    ) >> np.uint32(16)
    hi = (
        value_high * factor_high
        + (low_high >> np.uint32(16))
        + (high_low >> np.uint32(16))
        + carry
        + values * factor_hi
    )
    return hi, values * factor_lo


def _add_wide(
    left: tuple[jax.Array, jax.Array], right: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """``left + right mod 2**64`` on ``(hi, lo)`` uint32 word pairs."""
    lo = left[1] + right[1]
    carry = (lo < left[1]).astype(jnp.uint32)
    return left[0] + right[0] + carry, lo


def _combine_words(word1: jax.Array, word2: jax.Array, bit_width: int) -> jax.Array:
    """Threefry's two output words -> one element of ``bit_width`` bits, as jax combines them."""
    dtype = _UINT_DTYPES[bit_width]
    if bit_width == 64:
        high = lax.convert_element_type(word1, dtype)
        low = lax.convert_element_type(word2, dtype)
        return lax.shift_left(high, jnp.asarray(32, dtype)) | low
    mixed = word1 ^ word2
    # uint32 -> uint8/uint16 conversion keeps the low bits (wraps), which is what jax returns.
    return mixed if bit_width == 32 else lax.convert_element_type(mixed, dtype)
