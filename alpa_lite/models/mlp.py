"""A plain multi-layer perceptron: the smallest model the planner is tested on.

Input: float ``[batch, features]``. Output: float ``[batch, out]``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name=f"dense_{i}")(x))
        return nn.Dense(self.out, dtype=self.dtype, name=f"dense_{self.num_layers - 1}")(x)
