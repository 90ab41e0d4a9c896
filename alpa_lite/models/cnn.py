"""A tiny convolutional classifier exercising conv, BatchNorm and both pooling kinds.

Input: float32 images ``[batch, height, width, channels]`` (NHWC). Output: ``[batch, classes]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from alpa_lite.models.mlp import fan_in_normal_init


def avg_pool(x: jax.Array, window: int) -> jax.Array:
    """Non-overlapping ``window x window`` average pooling of an NHWC array.

    `flax.linen.avg_pool` divides by a numpy integer, which fails under
    ``jax_numpy_dtype_promotion="strict"``; this version divides by a Python float.

    Example:
        >>> avg_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
        Array([[ 2.5,  4.5],
               [10.5, 12.5]], dtype=float32)
    """
    summed = nn.pool(x, 0.0, lax.add, (window, window), (window, window), "VALID")
    return summed / float(window * window)


class SmallCNN(nn.Module):
    """conv -> BatchNorm -> relu -> max pool -> conv -> BatchNorm -> relu -> avg pool -> Dense.

    Call with ``train=True`` and ``mutable=["batch_stats"]`` to train.

    Attributes:
        num_classes: outputs of the classifier.
        features: channels of the two 3x3 convolutions.
        image_size: height and width of the images that `alpa_lite.models.make_batch` and
            `create_train_state` use; the network accepts any size divisible by 4.
        dtype: compute dtype (parameters are always float32).

    Example:
        >>> import jax
        >>> images = jnp.zeros((2, 16, 16, 3))
        >>> variables = SmallCNN().init(jax.random.key(0), images, train=False)
        >>> logits, _ = SmallCNN().apply(variables, images, mutable=["batch_stats"])
        >>> logits.shape
        (2, 10)
    """

    num_classes: int = 10
    features: Sequence[int] = (8, 16)
    image_size: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = True) -> jax.Array:
        if len(self.features) != 2:
            raise ValueError(f"SmallCNN has two convolutions; got features={self.features}.")
        x = images.astype(self.dtype)
        for i, features in enumerate(self.features):
            x = nn.Conv(features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                        kernel_init=fan_in_normal_init(2.0), name=f"conv_{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=jnp.float32,
                             name=f"bn_{i}")(x.astype(jnp.float32)).astype(self.dtype)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2)) if i == 0 else avg_pool(x, 2)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=fan_in_normal_init(1.0),
                        name="head")(x)
