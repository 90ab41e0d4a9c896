"""Wide-ResNet in flax linen, with the channel plan of the Alpa paper's WResNet benchmark.

Input: float32 images ``[batch, height, width, 3]`` (NHWC). Output: logits ``[batch, classes]``.

Two layouts, picked by depth (``num_layers``):

* ImageNet ResNets (He et al. 2016), depth 18/34 (basic blocks) or 50/101/152 (bottleneck
  blocks): a 7x7/2 stem convolution and a 3x3/2 max pool, then four stages.
* CIFAR Wide-ResNets WRN-d-k (Zagoruyko & Komodakis 2016), any other depth ``d = 6n + 4``
  (16, 28, 40, ...): a 3x3 stem convolution, then three stages of ``n`` basic blocks.

Stage ``i`` has ``C_i = base_channels * 2**i`` channels. The width factor ``W`` widens the 3x3
convolutions: a bottleneck block is ``1x1 -> C_i``, ``3x3 -> W * C_i``, ``1x1 -> 4 C_i``, and a
basic block is two ``3x3 -> W * C_i`` convolutions. This is the plan that reproduces the sizes in
Alpa's Table 4 (e.g. depth 50, C=160, W=2 gives 250M parameters; C=320, W=16 gives 6.8B). The
stride of a stage's first block sits on its 3x3 convolution (ResNet "v1.5"). Every convolution
is followed by train-mode BatchNorm (statistics in the mutable ``batch_stats`` collection) and
relu. A global average pool and one Dense layer make the head. Stages are named ``stage_i``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpa_lite.errors import InvalidConfigError
from alpa_lite.models.mlp import fan_in_normal_init

Dtype = Any
BlockKind = Literal["basic", "bottleneck"]

_IMAGENET_LAYOUTS: dict[int, tuple[BlockKind, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


@dataclasses.dataclass(frozen=True)
class WideResNetConfig:
    """Architecture of a `WideResNet`.

    Attributes:
        num_layers: depth: 18, 34, 50, 101, 152 (ImageNet layout) or ``6n + 4`` (CIFAR layout).
        width_factor: ``W``, the widening of the 3x3 convolutions.
        base_channels: ``C_0``, the channels of the stem and the first stage.
        num_classes: outputs of the classifier.
        image_size: height and width of the (square) input images.
        dtype: compute dtype (parameters and batch statistics are always float32).

    Example:
        >>> WideResNetConfig(50, 2, 160, 1024, 224).stage_sizes
        (3, 4, 6, 3)
    """

    num_layers: int
    width_factor: int
    base_channels: int
    num_classes: int
    image_size: int
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        self.layout  # noqa: B018 -- validates the depth eagerly.

    @property
    def layout(self) -> tuple[BlockKind, tuple[int, ...], bool]:
        """``(block kind, blocks per stage, uses the ImageNet stem)``."""
        if self.num_layers in _IMAGENET_LAYOUTS:
            kind, sizes = _IMAGENET_LAYOUTS[self.num_layers]
            return kind, sizes, True
        if self.num_layers >= 10 and (self.num_layers - 4) % 6 == 0:
            return "basic", ((self.num_layers - 4) // 6,) * 3, False
        raise InvalidConfigError(
            f"Unsupported Wide-ResNet depth num_layers={self.num_layers}: use one of "
            f"{sorted(_IMAGENET_LAYOUTS)} (ImageNet layout) or 6n + 4 such as 16, 28, 40."
        )

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        return self.layout[1]


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One convolution of the network, in execution order (for analytic FLOP/param counts)."""

    kernel: int
    in_channels: int
    out_channels: int
    out_size: int  # output height (= width)


def _block_convs(kind: BlockKind, in_ch: int, channels: int, width: int, stride: int,
                 in_size: int) -> list[ConvShape]:
    out_size = math.ceil(in_size / stride)
    if kind == "bottleneck":
        out_ch = 4 * channels
        convs = [ConvShape(1, in_ch, channels, in_size),
                 ConvShape(3, channels, width * channels, out_size),
                 ConvShape(1, width * channels, out_ch, out_size)]
    else:
        out_ch = width * channels
        convs = [ConvShape(3, in_ch, out_ch, out_size), ConvShape(3, out_ch, out_ch, out_size)]
    if in_ch != out_ch or stride != 1:
        convs.append(ConvShape(1, in_ch, out_ch, out_size))  # projection shortcut
    return convs


def enumerate_convs(config: WideResNetConfig) -> list[ConvShape]:
    """Every convolution of `WideResNet(config)` with its shape, mirroring the module's code.

    Example:
        >>> convs = enumerate_convs(WideResNetConfig(16, 1, 4, 10, 8))
        >>> len(convs), convs[0]
        (15, ConvShape(kernel=3, in_channels=3, out_channels=4, out_size=8))
    """
    kind, stage_sizes, imagenet_stem = config.layout
    size = config.image_size
    if imagenet_stem:
        size = math.ceil(size / 2)
        convs = [ConvShape(7, 3, config.base_channels, size)]
        size = math.ceil(size / 2)  # 3x3/2 max pool
    else:
        convs = [ConvShape(3, 3, config.base_channels, size)]
    in_ch = config.base_channels
    for i, num_blocks in enumerate(stage_sizes):
        for j in range(num_blocks):
            stride = 2 if i > 0 and j == 0 else 1
            block = _block_convs(kind, in_ch, config.base_channels * 2**i, config.width_factor,
                                 stride, size)
            convs += block
            in_ch, size = block[-1].out_channels, block[-1].out_size
    return convs


def estimate_wide_resnet_params(config: WideResNetConfig) -> int:
    """Trainable parameter count of `WideResNet(config)` (conv kernels, BN scale/bias, head).

    Example:
        >>> round(estimate_wide_resnet_params(WideResNetConfig(50, 2, 160, 1024, 224)) / 1e6)
        254
    """
    convs = enumerate_convs(config)
    conv_params = sum(c.kernel**2 * c.in_channels * c.out_channels + 2 * c.out_channels
                      for c in convs)
    final_channels = convs[-1].out_channels
    return conv_params + (final_channels + 1) * config.num_classes


class _ConvBN(nn.Module):
    """Convolution (no bias) + BatchNorm, optionally followed by relu."""

    features: int
    kernel: int
    stride: int = 1
    relu: bool = True
    zero_scale: bool = False  # zero-init the BN scale of a residual branch's last layer
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pad = self.kernel // 2
        x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                    padding=[(pad, pad), (pad, pad)], use_bias=False, dtype=self.dtype,
                    kernel_init=fan_in_normal_init(2.0), name="conv")(x)
        scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
        # Statistics in float32 with explicit casts: flax's bf16 BatchNorm path promotes
        # implicitly, which strict dtype promotion rejects.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=jnp.float32, scale_init=scale_init,
                         name="bn")(x.astype(jnp.float32)).astype(self.dtype)
        return nn.relu(x) if self.relu else x


class _Block(nn.Module):
    """One residual block (basic or bottleneck) with a projection shortcut when shapes change."""

    kind: BlockKind
    channels: int
    width_factor: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c, w = self.channels, self.width_factor
        if self.kind == "bottleneck":
            out_ch = 4 * c
            layers = [(c, 1, 1), (w * c, 3, self.stride), (out_ch, 1, 1)]
        else:
            out_ch = w * c
            layers = [(out_ch, 3, self.stride), (out_ch, 3, 1)]
        y = x
        for k, (features, kernel, stride) in enumerate(layers):
            last = k == len(layers) - 1
            y = _ConvBN(features, kernel, stride, relu=not last, zero_scale=last,
                        dtype=self.dtype, name=f"conv_{k}")(y, train)
        if x.shape[-1] != out_ch or self.stride != 1:
            x = _ConvBN(out_ch, 1, self.stride, relu=False, dtype=self.dtype, name="proj")(x, train)
        return nn.relu(x + y)


class _Stage(nn.Module):
    """``num_blocks`` residual blocks named ``block_j``; the first carries the stage's stride."""

    kind: BlockKind
    num_blocks: int
    channels: int
    width_factor: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for j in range(self.num_blocks):
            x = _Block(self.kind, self.channels, self.width_factor,
                       self.stride if j == 0 else 1, self.dtype, name=f"block_{j}")(x, train)
        return x


class WideResNet(nn.Module):
    """Wide-ResNet classifier; call with ``train=True`` and ``mutable=["batch_stats"]`` to train.

    Example:
        >>> import jax
        >>> cfg = WideResNetConfig(16, 2, 4, num_classes=10, image_size=8)
        >>> images = jnp.zeros((2, 8, 8, 3))
        >>> variables = WideResNet(cfg).init(jax.random.key(0), images, train=False)
        >>> sorted(variables)
        ['batch_stats', 'params']
        >>> logits, updates = WideResNet(cfg).apply(variables, images, mutable=["batch_stats"])
        >>> logits.shape
        (2, 10)
    """

    config: WideResNetConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = True) -> jax.Array:
        cfg = self.config
        kind, stage_sizes, imagenet_stem = cfg.layout
        x = images.astype(cfg.dtype)
        if imagenet_stem:
            x = _ConvBN(cfg.base_channels, 7, 2, dtype=cfg.dtype, name="stem")(x, train)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        else:
            x = _ConvBN(cfg.base_channels, 3, 1, dtype=cfg.dtype, name="stem")(x, train)
        for i, num_blocks in enumerate(stage_sizes):
            x = _Stage(kind, num_blocks, cfg.base_channels * 2**i, cfg.width_factor,
                       stride=2 if i > 0 else 1, dtype=cfg.dtype, name=f"stage_{i}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(cfg.num_classes, dtype=cfg.dtype, kernel_init=fan_in_normal_init(1.0),
                        name="head")(x)
