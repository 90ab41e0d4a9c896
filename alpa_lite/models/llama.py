"""A LLaMA/LLaMA-2 decoder in flax linen.

Input: int32 token ids ``[batch, seq]``. Output: logits ``[batch, seq, vocab]``.

Differences from `alpa_lite.models.gpt.GPT`, following Touvron et al. 2023 (LLaMA 2, §2.2):
RMSNorm instead of LayerNorm, rotary position embeddings (RoPE) on queries and keys instead of a
learned position table, a SwiGLU MLP ``down(silu(gate(x)) * up(x))``, no biases anywhere, and an
LM head that is not tied to the embedding. Grouped-query attention (used by LLaMA-2 70B only) is
not modelled. Blocks are named ``block_0``, ``block_1``, ... as in `GPT`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alpa_lite.errors import InvalidConfigError
from alpa_lite.models.gpt import apply_blocks, causal_attention
from alpa_lite.models.mlp import normal_init

Dtype = Any
_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a `Llama`.

    Attributes:
        vocab_size: number of token ids.
        hidden_size: model width ``h``.
        num_layers: number of decoder blocks ``L``.
        num_heads: attention heads; must divide ``hidden_size``.
        ffn_size: inner width ``f`` of the SwiGLU MLP (11008 for LLaMA-2 7B).
        seq_len: maximum sequence length (RoPE tables are built for this length).
        rope_theta: RoPE base frequency.
        norm_eps: RMSNorm epsilon.
        dtype: compute dtype (parameters are always float32).
        remat: wrap every block in `flax.linen.remat`.
        scan_layers: run the blocks as one `flax.linen.scan` over stacked parameters (one
            ``blocks`` module with a leading ``num_layers`` dim on every kernel).

    Example:
        >>> LlamaConfig(128, 64, 2, 4, ffn_size=176, seq_len=16).head_dim
        16
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.head_dim % 2:
            raise InvalidConfigError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads} "
                "with an even head_dim (RoPE rotates pairs of features)."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def apply_rotary_embedding(x: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotates ``x`` of shape ``[batch, seq, heads, head_dim]`` by its positions (RoPE).

    Feature ``i`` of the first half is paired with feature ``i`` of the second half and the pair is
    rotated by angle ``position * theta^(-2i / head_dim)`` (the "rotate-half" layout). The angle
    tables are numpy constants, so nothing here depends on traced values.

    Example:
        >>> x = jnp.ones((1, 4, 2, 8))
        >>> bool(jnp.allclose(apply_rotary_embedding(x)[:, 0], x[:, 0]))  # position 0: identity
        True
    """
    seq_len, head_dim = x.shape[1], x.shape[3]
    half = head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    angles = np.outer(np.arange(seq_len, dtype=np.float64), inv_freq)  # [seq, half]
    cos = jnp.asarray(np.cos(angles)[None, :, None, :], dtype=x.dtype)
    sin = jnp.asarray(np.sin(angles)[None, :, None, :], dtype=x.dtype)
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def _rms_norm_f32(x: jax.Array, cfg: LlamaConfig, name: str) -> jax.Array:
    # Statistics in float32 with explicit casts (see `alpa_lite.models.gpt.layer_norm_f32`).
    norm = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, name=name)
    return norm(x.astype(jnp.float32)).astype(cfg.dtype)


class LlamaBlock(nn.Module):
    """One LLaMA block: ``x + attn(rmsnorm(x))``, then ``x + swiglu(rmsnorm(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        batch, seq_len, hidden = x.shape
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=cfg.dtype,
            kernel_init=normal_init(_INIT_STD), name=name,
        )
        heads = (batch, seq_len, cfg.num_heads, cfg.head_dim)

        y = _rms_norm_f32(x, cfg, "attn_norm")
        q = apply_rotary_embedding(dense(hidden, "q_proj")(y).reshape(heads), cfg.rope_theta)
        k = apply_rotary_embedding(dense(hidden, "k_proj")(y).reshape(heads), cfg.rope_theta)
        v = dense(hidden, "v_proj")(y).reshape(heads)
        attn = causal_attention(q, k, v).reshape(batch, seq_len, hidden)
        x = x + dense(hidden, "o_proj")(attn)

        y = _rms_norm_f32(x, cfg, "mlp_norm")
        gated = nn.silu(dense(cfg.ffn_size, "gate_proj")(y)) * dense(cfg.ffn_size, "up_proj")(y)
        return x + dense(hidden, "down_proj")(gated)


class _ScannedLlamaBlock(LlamaBlock):
    """`LlamaBlock` with the ``(carry, x) -> (carry, y)`` signature `flax.linen.scan` needs."""

    def __call__(self, x: jax.Array, _) -> tuple[jax.Array, None]:
        return super().__call__(x), None


class Llama(nn.Module):
    """LLaMA-style decoder-only language model with an untied LM head.

    Example:
        >>> import jax
        >>> cfg = LlamaConfig(32, 16, num_layers=2, num_heads=2, ffn_size=40, seq_len=8)
        >>> tokens = jnp.zeros((2, 8), jnp.int32)
        >>> variables = Llama(cfg).init(jax.random.key(0), tokens)
        >>> Llama(cfg).apply(variables, tokens).shape
        (2, 8, 32)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        if tokens.shape[1] > cfg.seq_len:
            raise ValueError(
                f"Got {tokens.shape[1]} tokens per sequence; the model's seq_len is {cfg.seq_len}."
            )
        x = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
            embedding_init=normal_init(_INIT_STD), name="token_embed",
        )(tokens)
        x = apply_blocks(x, cfg, LlamaBlock, _ScannedLlamaBlock)
        x = _rms_norm_f32(x, cfg, "final_norm")
        return nn.Dense(
            cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
            kernel_init=normal_init(_INIT_STD), name="lm_head",
        )(x)


def estimate_llama_params(config: LlamaConfig) -> int:
    """Parameter count of `Llama` in closed form.

    Per block: ``4 h^2`` attention weights, ``3 h f`` SwiGLU weights and two RMSNorm scales ``2h``;
    plus the embedding and the untied head ``2 V h`` and the final RMSNorm ``h``.

    Example:
        >>> estimate_llama_params(LlamaConfig(32000, 4096, 32, 32, ffn_size=11008, seq_len=4096))
        6738415616
    """
    h, f = config.hidden_size, config.ffn_size
    per_block = 4 * h * h + 3 * h * f + 2 * h
    return config.num_layers * per_block + 2 * config.vocab_size * h + h
