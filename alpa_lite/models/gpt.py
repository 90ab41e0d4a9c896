"""A Megatron-style GPT (GPT-2/GPT-3 layout) in flax linen.

Input: int32 token ids ``[batch, seq]``. Output: logits ``[batch, seq, vocab]``.

Layout: token embedding + learned position embedding, ``num_layers`` pre-LayerNorm blocks
(causal self-attention with one fused qkv projection, then a ``Dense(mlp_ratio * h)``-gelu-
``Dense(h)`` MLP), a final LayerNorm and an LM head tied to the token embedding. This is the
model of the Alpa paper's GPT-3 experiments (OSDI'22, §8.1) and of Megatron-LM.

Blocks are named ``block_0``, ``block_1``, ...: flax module names survive into jaxpr name stacks,
and the layer-clustering pass uses them to find transformer layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpa_lite.errors import InvalidConfigError
from alpa_lite.models.mlp import normal_init

Dtype = Any

# GPT-2 / Megatron initialisation: N(0, 0.02) everywhere, and residual-branch output projections
# scaled by 1/sqrt(2 * num_layers) so that the residual stream's variance does not grow with depth.
_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture of a `GPT`.

    Attributes:
        vocab_size: number of token ids.
        hidden_size: model width ``h``.
        num_layers: number of transformer blocks ``L``.
        num_heads: attention heads; must divide ``hidden_size``.
        seq_len: maximum sequence length (size of the position embedding).
        mlp_ratio: the MLP's inner width is ``mlp_ratio * hidden_size``.
        dtype: compute dtype (parameters are always float32).
        remat: wrap every block in `flax.linen.remat` (recompute activations in the backward pass).
        scan_layers: run the blocks as one `flax.linen.scan` over stacked parameters (one
            ``blocks`` module whose kernels have a leading ``num_layers`` dim), as MaxText's
            ``scan_layers=True`` does: trace and compile time stay flat in depth.

    Example:
        >>> GPTConfig(128, hidden_size=64, num_layers=2, num_heads=4, seq_len=16).head_dim
        16
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    seq_len: int
    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise InvalidConfigError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}; "
                "pick a head count that divides the width."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def layer_norm_f32(x: jax.Array, *, name: str, dtype: Dtype) -> jax.Array:
    """LayerNorm computed in float32, returned in ``dtype`` (call inside a compact module).

    Normalisation statistics need float32 under bf16 compute. flax's own mixed-dtype path
    (``nn.LayerNorm(dtype=jnp.bfloat16)``) promotes bf16 with float32 implicitly, which
    ``jax_numpy_dtype_promotion="strict"`` rejects, so the casts are explicit here.
    """
    return nn.LayerNorm(dtype=jnp.float32, name=name)(x.astype(jnp.float32)).astype(dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal scaled dot-product attention over ``[batch, seq, heads, head_dim]`` arrays.

    The softmax runs in float32 whatever the compute dtype; the result has ``q``'s dtype.

    Example:
        >>> x = jnp.ones((1, 3, 2, 4))
        >>> causal_attention(x, x, x).shape
        (1, 3, 2, 4)
    """
    seq_len, head_dim = q.shape[1], q.shape[3]
    q = q * (1.0 / math.sqrt(head_dim))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32)
    is_visible = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))
    scores = jnp.where(is_visible[None, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", weights, v)


class GPTBlock(nn.Module):
    """One pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        batch, seq_len, hidden = x.shape
        dense = lambda features, std, name: nn.Dense(  # noqa: E731
            features, dtype=cfg.dtype, kernel_init=normal_init(std), name=name
        )
        out_std = _INIT_STD / math.sqrt(2 * cfg.num_layers)

        y = layer_norm_f32(x, name="ln_attn", dtype=cfg.dtype)
        # Megatron's fused-qkv layout: the 3h output features are grouped per head as
        # [head, (q, k, v), head_dim], so sharding them in contiguous chunks splits whole heads
        # and the reshape below needs no communication (column-parallel attention).
        qkv = dense(3 * hidden, _INIT_STD, "qkv")(y)
        qkv = qkv.reshape(batch, seq_len, cfg.num_heads, 3, cfg.head_dim)
        attn = causal_attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2])
        x = x + dense(hidden, out_std, "attn_out")(attn.reshape(batch, seq_len, hidden))

        y = layer_norm_f32(x, name="ln_mlp", dtype=cfg.dtype)
        y = nn.gelu(dense(cfg.mlp_ratio * hidden, _INIT_STD, "fc_in")(y))
        return x + dense(hidden, out_std, "fc_out")(y)


class _ScannedBlock(GPTBlock):
    """`GPTBlock` with the ``(carry, x) -> (carry, y)`` signature `flax.linen.scan` needs."""

    def __call__(self, x: jax.Array, _) -> tuple[jax.Array, None]:
        return super().__call__(x), None


def apply_blocks(x: jax.Array, cfg, block_cls, scanned_cls) -> jax.Array:
    """``cfg.num_layers`` blocks over ``x`` (call inside a compact module): ``block_cls``
    modules ``block_0`` ... in a Python loop, or with ``cfg.scan_layers`` one `flax.linen.scan`
    of ``scanned_cls`` named ``blocks`` (parameters stacked on axis 0); each block
    rematerialized when ``cfg.remat``."""
    if cfg.scan_layers:
        cls = nn.remat(scanned_cls) if cfg.remat else scanned_cls
        blocks = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=cfg.num_layers)
        return blocks(cfg, name="blocks")(x, None)[0]
    cls = nn.remat(block_cls) if cfg.remat else block_cls
    for i in range(cfg.num_layers):
        x = cls(cfg, name=f"block_{i}")(x)
    return x


class GPT(nn.Module):
    """Decoder-only GPT language model with an LM head tied to the token embedding.

    Example:
        >>> import jax
        >>> cfg = GPTConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, seq_len=8)
        >>> tokens = jnp.zeros((2, 8), jnp.int32)
        >>> params = GPT(cfg).init(jax.random.key(0), tokens)["params"]
        >>> sorted(params)[:3]
        ['block_0', 'block_1', 'ln_final']
        >>> GPT(cfg).apply({"params": params}, tokens).shape
        (2, 8, 32)
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        seq_len = tokens.shape[1]
        if seq_len > cfg.seq_len:
            raise ValueError(
                f"Got {seq_len} tokens per sequence; the model's seq_len is {cfg.seq_len}."
            )
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
            embedding_init=normal_init(_INIT_STD), name="token_embed",
        )
        positions = self.param(
            "position_embed", normal_init(_INIT_STD), (cfg.seq_len, cfg.hidden_size)
        )
        x = embed(tokens) + positions[None, :seq_len].astype(cfg.dtype)
        x = apply_blocks(x, cfg, GPTBlock, _ScannedBlock)
        x = layer_norm_f32(x, name="ln_final", dtype=cfg.dtype)
        return embed.attend(x)


def estimate_gpt_params(config: GPTConfig) -> int:
    """Parameter count of `GPT` in closed form (matches `count_params` of an initialised model).

    Per block: ``(4 + 2r) h^2`` weights (qkv ``3h^2``, attention output ``h^2``, MLP ``2r h^2``),
    ``(5 + r) h`` biases (qkv ``3h``, attention output ``h``, MLP ``rh + h``) and ``4h`` LayerNorm
    scales/biases. Plus token ``V h`` and position ``s h`` embeddings and the final LayerNorm
    ``2h``.

    Example:
        >>> estimate_gpt_params(GPTConfig(128, 64, 2, 4, 16))
        109312
    """
    h, r = config.hidden_size, config.mlp_ratio
    per_block = (4 + 2 * r) * h * h + (5 + r) * h + 4 * h
    embeddings = (config.vocab_size + config.seq_len) * h
    return config.num_layers * per_block + embeddings + 2 * h
