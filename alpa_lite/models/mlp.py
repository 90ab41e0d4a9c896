"""A plain multi-layer perceptron, and the parameter initializers every model of the zoo uses.

Input: float ``[batch, features]``. Output: float ``[batch, out]``.

The initializers draw i.i.d. entries as one flat vector and reshape it. The distribution is the
same as flax's, but XLA:CPU compiles partitionable-threefry draws of small multi-dimensional
shapes several times slower than flat ones (ten random rank-4 kernels: about 30 s against 3 s),
which made initialising even tiny models dominate the CPU test suite.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


Initializer = Callable[..., jax.Array]


def normal_init(std: float) -> Initializer:
    """i.i.d. ``N(0, std^2)`` entries (the flat-draw version of `flax.linen.initializers.normal`).

    Example:
        >>> normal_init(0.02)(jax.random.key(0), (4, 8)).shape
        (4, 8)
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return (std * jax.random.normal(key, (math.prod(shape),), dtype)).reshape(shape)

    return init


def fan_in_normal_init(scale: float = 1.0) -> Initializer:
    """i.i.d. ``N(0, scale / fan_in)`` entries for a Dense ``(in, out)`` or HWIO conv kernel.

    ``fan_in`` is the product of all dims but the last. ``scale=2`` is He initialisation (for
    relu layers), ``scale=1`` LeCun's.

    Example:
        >>> kernel = fan_in_normal_init(2.0)(jax.random.key(0), (3, 3, 4, 8))
        >>> kernel.shape
        (3, 3, 4, 8)
    """

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        std = math.sqrt(scale / math.prod(shape[:-1]))
        return normal_init(std)(key, shape, dtype)

    return init


class MLP(nn.Module):
    """``num_layers`` Dense layers with biases: ``num_layers - 1`` x (Dense(hidden) + relu), then
    Dense(out). A "6-layer MLP" is ``MLP(hidden, 6, out)``. Layers are named ``dense_0``, ...

    Attributes:
        hidden: width of the hidden layers.
        num_layers: total number of Dense layers (at least 1).
        out: width of the last layer.
        in_features: width of the inputs that `alpa_lite.models.make_batch` and
            `create_train_state` use (``hidden`` when None); the layers themselves accept any.
        dtype: compute dtype (parameters are always float32).

    Example:
        >>> import jax
        >>> model = MLP(hidden=16, num_layers=3, out=4)
        >>> params = model.init(jax.random.key(0), jnp.ones((2, 8)))["params"]
        >>> sorted(params)
        ['dense_0', 'dense_1', 'dense_2']
        >>> model.apply({"params": params}, jnp.ones((2, 8))).shape
        (2, 4)
    """

    hidden: int
    num_layers: int
    out: int
    in_features: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {self.num_layers}.")
        x = x.astype(self.dtype)
        for i in range(self.num_layers - 1):
            x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=fan_in_normal_init(2.0),
                         name=f"dense_{i}")(x)
            x = nn.relu(x)
        return nn.Dense(self.out, dtype=self.dtype, kernel_init=fan_in_normal_init(1.0),
                        name=f"dense_{self.num_layers - 1}")(x)
