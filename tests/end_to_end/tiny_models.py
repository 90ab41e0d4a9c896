"""Tiny flax models and train steps shared by the end-to-end tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import alpa_lite


class MLP(nn.Module):
    """``num_layers`` Dense layers of width ``hidden``, relu between them.

    ``manual_boundaries`` marks a pipeline layer boundary after every Dense + relu.
    """

    hidden: int
    num_layers: int
    manual_boundaries: bool = False

    @nn.compact
    def __call__(self, x):
        for _ in range(self.num_layers - 1):
            x = nn.relu(nn.Dense(self.hidden)(x))
            if self.manual_boundaries:
                alpa_lite.mark_pipeline_boundary()
        return nn.Dense(self.hidden)(x)


class BertLayer(nn.Module):
    """A BERT layer with a fused qkv projection (as in Alpa's test model)."""

    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x):
        batch, seq, _ = x.shape
        head_dim = self.hidden // self.heads
        qkv = nn.DenseGeneral((3, self.heads, head_dim), name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        out = nn.DenseGeneral(self.hidden, axis=(-2, -1), name="attn_out")(attn)
        x = nn.LayerNorm()(x + out)
        h = nn.gelu(nn.Dense(4 * self.hidden, name="intermediate")(x))
        h = nn.Dense(self.hidden, name="output")(h)
        return nn.LayerNorm()(x + h)


class Bert(nn.Module):
    hidden: int
    heads: int
    num_layers: int
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        layer = nn.remat(BertLayer) if self.remat else BertLayer
        for i in range(self.num_layers):
            x = layer(self.hidden, self.heads, name=f"layer_{i}")(x)
        return x


class CNN(nn.Module):
    """conv-BatchNorm-relu-maxpool, conv-BatchNorm-relu-avgpool, Dense."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(16, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class BNState(train_state.TrainState):
    batch_stats: dict


def mse_step(state, batch):
    def loss_fn(params):
        return jnp.mean((state.apply_fn(params, batch["x"]) - batch["y"]) ** 2)

    loss, grads = alpa_lite.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def make_mlp(batch: int, hidden: int, num_layers: int, optimizer=None, seed: int = 0,
             manual_boundaries: bool = False):
    model = MLP(hidden, num_layers, manual_boundaries)
    rng = np.random.default_rng(seed)
    data = {"x": jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32)}
    params = model.init(jax.random.PRNGKey(seed), data["x"])
    # eps=1e-3: Adam's first steps divide by |g|; a larger eps keeps round-off in g (from a
    # different summation order) from being amplified for near-zero gradients.
    tx = optimizer or optax.adam(1e-2, eps=1e-3)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx), data


def make_bert(batch=8, seq=8, hidden=128, heads=8, num_layers=2, remat=False):
    model = Bert(hidden, heads, num_layers, remat)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, seq, hidden)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=optax.sgd(1e-2))
    return state, {"x": x, "y": 0.5 * x}


def make_cnn(batch: int = 16):
    model = CNN()
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32)}
    variables = model.init(jax.random.PRNGKey(0), data["image"])
    state = BNState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           tx=optax.sgd(0.05, momentum=0.9))
    return state, data


def cnn_step(state, batch):
    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         batch["image"], mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, updates["batch_stats"]

    (loss, stats), grads = alpa_lite.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads).replace(batch_stats=stats), loss


def run_steps(step_fn, state, batch, num_steps: int = 3):
    losses = []
    for _ in range(num_steps):
        state, loss = step_fn(state, batch)
        losses.append(loss)
    return state, losses
