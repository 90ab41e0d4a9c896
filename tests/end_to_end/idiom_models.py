"""Small models written the way third-party JAX libraries write them (our own code), each
with a train step in its library's idiom: `jax.value_and_grad` (or `nnx.value_and_grad`),
SGD with momentum through optax, the loss a plain ``.mean()``.

Each entry of `IDIOMS` builds ``(step, state, batches)``: the step takes ``(state, batch)``
and returns ``(state, loss)``; ``batches`` are fresh host (numpy) batches of 8 examples.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

BATCH, SEQ, VOCAB, DIM = 8, 8, 32, 16
OPT = optax.sgd(0.05, momentum=0.9)


def _linen_step(model, loss_of):
    def step(state, batch):
        params, opt_state = state

        def loss_fn(params):
            return loss_of(model.apply(params, batch["x"]), batch)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = OPT.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def _flattened_xent(logits, batch):
    """The common flattened cross-entropy: logits and labels reshaped to (-1, V) and (-1,)."""
    flat = logits.reshape(-1, logits.shape[-1])
    labels = batch["y"].reshape(-1)
    return optax.softmax_cross_entropy_with_integer_labels(flat, labels).mean()


def _tokens(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
            "y": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)}


def _rope(x):
    """Rotary embedding written with jnp.split (halves), as most libraries write it."""
    half = x.shape[-1] // 2
    freqs = 1.0 / (10000 ** (jnp.arange(half) / half))
    angles = jnp.arange(x.shape[-3])[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class RopeBlock(nn.Module):
    """A transformer block with a fused QKV projection split three ways, and RoPE."""

    heads: int = 2

    @nn.compact
    def __call__(self, x):
        b, s, d = x.shape
        h = nn.LayerNorm()(x)
        q, k, v = jnp.split(nn.Dense(3 * d)(h), 3, axis=-1)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads) for t in (q, k, v))
        q, k = _rope(q), _rope(k)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
        att = jnp.where(jnp.tril(jnp.ones((s, s), bool)), att, -1e9)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, axis=-1), v).reshape(b, s, d)
        x = x + nn.Dense(d)(out)
        return x + nn.Dense(d)(jax.nn.gelu(nn.Dense(2 * d)(nn.LayerNorm()(x))))


class RopeLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, DIM)(tokens)
        x = RopeBlock()(RopeBlock()(x))
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))


class ScannedViT(nn.Module):
    """A ViT: conv patch embedding, a CLS token tiled to the batch, position embeddings,
    blocks stacked with nn.scan, classification from the CLS token."""

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(DIM, (4, 4), strides=(4, 4))(images)
        x = x.reshape(x.shape[0], -1, DIM)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, DIM))
        x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], DIM))
        blocks = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=2)
        x, _ = blocks()(x, None)
        return nn.Dense(10)(nn.LayerNorm()(x[:, 0]))


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=DIM)(h)
        x = x + h
        return x + nn.Dense(DIM)(jax.nn.relu(nn.Dense(2 * DIM)(nn.LayerNorm()(x)))), None


class TopKMoE(nn.Module):
    """A mixture-of-experts layer: a router's top-2 of 4 experts, stacked expert weights,
    dispatch by one-hot gathers, as MoE layers write it."""

    experts: int = 4
    k: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, DIM)(tokens)
        gates, index = jax.lax.top_k(jax.nn.softmax(nn.Dense(self.experts)(x)), self.k)
        w_in = self.param("w_in", nn.initializers.lecun_normal(), (self.experts, DIM, 2 * DIM))
        w_out = self.param("w_out", nn.initializers.lecun_normal(), (self.experts, 2 * DIM, DIM))
        dispatch = jax.nn.one_hot(index, self.experts)                    # b s k e
        h = jnp.einsum("bsd,edf->bsef", x, w_in)
        y = jnp.einsum("bsef,efd->bsed", jax.nn.silu(h), w_out)
        combine = jnp.einsum("bske,bsk->bse", dispatch, gates)
        x = x + jnp.einsum("bsed,bse->bsd", y, combine)
        return nn.Dense(VOCAB)(x)


class LSTMTagger(nn.Module):
    """An LSTM over the sequence (lax.scan), gates computed fused and split with jnp.split."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, DIM)(tokens)
        w = self.param("w", nn.initializers.lecun_normal(), (2 * DIM, 4 * DIM))
        b = self.param("b", nn.initializers.zeros, (4 * DIM,))

        def cell(carry, x_t):
            c, h = carry
            i, f, g, o = jnp.split(jnp.concatenate([x_t, h], -1) @ w + b, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, h), h

        zeros = jnp.zeros((x.shape[0], DIM), x.dtype)
        _, hs = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(x, 0, 1))
        return nn.Dense(VOCAB)(jnp.swapaxes(hs, 0, 1))


def _linen_idiom(model, sample, loss_of, batches):
    params = model.init(jax.random.key(0), sample)
    return _linen_step(model, loss_of), (params, OPT.init(params)), batches


def rope_lm():
    return _linen_idiom(RopeLM(), np.zeros((BATCH, SEQ), np.int32), _flattened_xent,
                        [_tokens(i) for i in range(3)])


def scanned_vit():
    def images(i):
        rng = np.random.default_rng(i)
        return {"x": rng.normal(size=(BATCH, 8, 8, 3)).astype(np.float32),
                "y": rng.integers(0, 10, (BATCH,)).astype(np.int32)}

    def loss_of(logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return _linen_idiom(ScannedViT(), np.zeros((BATCH, 8, 8, 3), np.float32), loss_of,
                        [images(i) for i in range(3)])


def top_k_moe():
    return _linen_idiom(TopKMoE(), np.zeros((BATCH, SEQ), np.int32), _flattened_xent,
                        [_tokens(i) for i in range(3)])


def lstm():
    return _linen_idiom(LSTMTagger(), np.zeros((BATCH, SEQ), np.int32), _flattened_xent,
                        [_tokens(i) for i in range(3)])


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.hidden = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
        self.out = nnx.Linear(2 * DIM, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        return self.out(jax.nn.gelu(self.hidden(self.embed(tokens))))


def nnx_mlp():
    """An NNX model trained functionally: split once, merged in the step, gradients from
    nnx.value_and_grad."""
    graphdef, params = nnx.split(NNXMLP(nnx.Rngs(0)), nnx.Param)

    def step(state, batch):
        params, opt_state = state
        model = nnx.merge(graphdef, params)

        def loss_fn(model):
            return _flattened_xent(model(batch["x"]), batch)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        updates, opt_state = OPT.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step, (params, OPT.init(params)), [_tokens(i) for i in range(3)]


IDIOMS = {"rope_fused_qkv": rope_lm, "scanned_vit_conv_cls": scanned_vit,
          "top_k_moe": top_k_moe, "lstm_split_gates": lstm, "nnx_value_and_grad": nnx_mlp}


def explicit_sharding_mesh():
    """A model written for an explicit-sharding mesh (as jimm or MaxText write them):
    arguments placed on the user's mesh, `reshard` of the batch, `out_sharding=` on matmuls.
    Returns ``(mesh, step, state, batches)``; call everything under ``jax.set_mesh(mesh)``."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

    def step(state, batch):
        params, opt_state = state

        def loss_fn(params):
            x = jax.sharding.reshard(batch["x"], P("data", None))
            h = jnp.einsum("bd,df->bf", x, params["w1"], out_sharding=P("data", "model"))
            out = jnp.einsum("bf,fd->bd", jax.nn.relu(h), params["w2"],
                             out_sharding=P("data", None))
            return jnp.mean((out - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = OPT.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        params = {
            "w1": jax.device_put(rng.normal(size=(DIM, 2 * DIM)).astype(np.float32) * 0.3,
                                 NamedSharding(mesh, P(None, "model"))),
            "w2": jax.device_put(rng.normal(size=(2 * DIM, DIM)).astype(np.float32) * 0.3,
                                 NamedSharding(mesh, P("model", None)))}
        state = (params, OPT.init(params))
    batches = [{"x": rng.normal(size=(BATCH, DIM)).astype(np.float32),
                "y": rng.normal(size=(BATCH, DIM)).astype(np.float32)} for _ in range(3)]
    return mesh, step, state, batches
