"""Training workloads for the model zoo: train state, batches, train step and model FLOPs.

Input: a `ModelPreset` (or a model instance). Output: what a test, benchmark or the CLI needs to
run or plan one training step. With ``abstract=True`` the builders return `jax.ShapeDtypeStruct`
pytrees made by `jax.eval_shape`, so planning LLaMA-2 13B allocates no weights.

Batches are dicts: ``{"tokens", "targets"}`` (int32 ``[B, S]``) for the language models,
``{"images", "labels"}`` (float32 NHWC, int32 ``[B]``) for the image models and
``{"inputs", "targets"}`` (float32) for `MLP` regression.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from alpa_lite.errors import InvalidConfigError
from alpa_lite.markers import value_and_grad
from alpa_lite.models.cnn import SmallCNN
from alpa_lite.models.gpt import GPT, GPTConfig
from alpa_lite.models.llama import Llama, LlamaConfig
from alpa_lite.models.mlp import MLP
from alpa_lite.models.presets import ModelPreset
from alpa_lite.models.wide_resnet import WideResNet, WideResNetConfig, enumerate_convs

LossKind = Literal["lm", "xent", "mse"]
Batch = dict[str, Any]
TrainStep = Callable[[train_state.TrainState, Batch], tuple[train_state.TrainState, jax.Array]]


class BatchNormTrainState(train_state.TrainState):
    """`TrainState` plus the BatchNorm running statistics of WideResNet / SmallCNN."""

    batch_stats: Any = None


def build_model(preset: ModelPreset) -> nn.Module:
    """Returns the flax module of ``preset``.

    Example:
        >>> from alpa_lite.models.presets import get_preset
        >>> type(build_model(get_preset("gpt-tiny"))).__name__
        'GPT'
    """
    config = preset.config
    if isinstance(config, GPTConfig):
        return GPT(config)
    if isinstance(config, LlamaConfig):
        return Llama(config)
    return WideResNet(config)


def _as_model(preset_or_model: ModelPreset | nn.Module) -> nn.Module:
    if isinstance(preset_or_model, ModelPreset):
        return build_model(preset_or_model)
    if isinstance(preset_or_model, (GPT, Llama, WideResNet, MLP, SmallCNN)):
        return preset_or_model
    raise InvalidConfigError(
        f"Expected a ModelPreset or a GPT/Llama/WideResNet/MLP/SmallCNN, got "
        f"{type(preset_or_model).__name__}; use alpa_lite.models.get_preset(name)."
    )


def _has_batch_norm(model: nn.Module) -> bool:
    return isinstance(model, (WideResNet, SmallCNN))


def default_loss(model: nn.Module) -> LossKind:
    """The loss a model is trained with: ``"lm"``, ``"xent"`` (images) or ``"mse"`` (MLP)."""
    if isinstance(model, (GPT, Llama)):
        return "lm"
    return "xent" if _has_batch_norm(model) else "mse"


def default_optimizer(model: nn.Module) -> optax.GradientTransformation:
    """AdamW(1e-3) after global-norm clipping at 1.0 for dense models; SGD(0.1, momentum 0.9)
    for the convolutional ones.

    Example:
        >>> isinstance(default_optimizer(MLP(8, 2, 1)), optax.GradientTransformation)
        True
    """
    if _has_batch_norm(model):
        return with_standard_promotion(optax.sgd(0.1, momentum=0.9))
    return with_standard_promotion(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))


def with_standard_promotion(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``tx``'s ``init`` and ``update`` under ``jax.numpy_dtype_promotion("standard")``.

    optax's Adam computes ``b1 ** count`` (a Python float to the power of an int32 step count),
    which ``jax_numpy_dtype_promotion="strict"`` rejects. Strict promotion is there to catch
    mistakes in alpa_lite and in the models, so only the optimizer gets the standard rules; the
    results are those of ``tx`` itself.

    Example:
        >>> tx = with_standard_promotion(optax.adamw(1e-3))
        >>> with jax.numpy_dtype_promotion("strict"):
        ...     updates, _ = tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2))
        >>> updates.shape
        (2,)
    """

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            if isinstance(tx, optax.GradientTransformationExtraArgs):
                return tx.update(updates, state, params, **extra_args)
            return tx.update(updates, state, params)

    return optax.GradientTransformationExtraArgs(init, update)


def _batch_spec(model: nn.Module, batch_size: int) -> tuple[Batch, int]:
    """The abstract batch of ``model`` and the number of classes of its integer labels."""
    f32, i32 = jnp.float32, jnp.int32
    if isinstance(model, (GPT, Llama)):
        tokens = jax.ShapeDtypeStruct((batch_size, model.config.seq_len), i32)
        return {"tokens": tokens, "targets": tokens}, model.config.vocab_size
    if isinstance(model, MLP):
        width = model.in_features or model.hidden
        return {"inputs": jax.ShapeDtypeStruct((batch_size, width), f32),
                "targets": jax.ShapeDtypeStruct((batch_size, model.out), f32)}, 0
    size = model.config.image_size if isinstance(model, WideResNet) else model.image_size
    num_classes = model.config.num_classes if isinstance(model, WideResNet) else model.num_classes
    return {"images": jax.ShapeDtypeStruct((batch_size, size, size, 3), f32),
            "labels": jax.ShapeDtypeStruct((batch_size,), i32)}, num_classes


def _as_key(rng: jax.Array | int | None) -> jax.Array:
    if rng is None:
        return jax.random.key(0)
    return jax.random.key(rng) if isinstance(rng, int) else rng


def make_batch(preset_or_model: ModelPreset | nn.Module, batch_size: int | None = None,
               rng: jax.Array | int | None = None, abstract: bool = False) -> Batch:
    """A random batch (or its `jax.ShapeDtypeStruct`s) for one training step.

    Language-model targets are the tokens shifted by one position.

    Args:
        preset_or_model: a `ModelPreset` or a model instance.
        batch_size: global batch size; the preset's default when None.
        rng: a PRNG key or an integer seed (0 when None).
        abstract: return shapes and dtypes only.

    Example:
        >>> from alpa_lite.models.presets import get_preset
        >>> batch = make_batch(get_preset("gpt-tiny"), 4)
        >>> batch["tokens"].shape, batch["targets"].dtype
        ((4, 16), dtype('int32'))
    """
    model = _as_model(preset_or_model)
    batch_size = _resolve_batch_size(preset_or_model, batch_size)
    spec, num_classes = _batch_spec(model, batch_size)
    if abstract:
        return spec
    key_a, key_b = jax.random.split(_as_key(rng))
    if "tokens" in spec:
        batch_tokens, seq_len = spec["tokens"].shape
        seq = jax.random.randint(key_a, (batch_tokens, seq_len + 1), 0, num_classes, jnp.int32)
        return {"tokens": seq[:, :-1], "targets": seq[:, 1:]}
    if "images" in spec:
        images = jax.random.normal(key_a, spec["images"].shape, jnp.float32)
        labels = jax.random.randint(key_b, spec["labels"].shape, 0, num_classes, jnp.int32)
        return {"images": images, "labels": labels}
    return {name: jax.random.normal(key, s.shape, jnp.float32)
            for (name, s), key in zip(spec.items(), (key_a, key_b))}


def _resolve_batch_size(preset_or_model: ModelPreset | nn.Module, batch_size: int | None) -> int:
    if batch_size is None:
        if not isinstance(preset_or_model, ModelPreset):
            raise InvalidConfigError("batch_size is required when a model (not a preset) is given.")
        return preset_or_model.default_batch_size
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be positive, got {batch_size}.")
    return batch_size


def create_train_state(preset_or_model: ModelPreset | nn.Module, rng: jax.Array | int | None = None,
                       batch_size: int | None = None,
                       optimizer: optax.GradientTransformation | None = None,
                       abstract: bool = False) -> train_state.TrainState:
    """Initialises parameters and optimizer state, or only their shapes when ``abstract=True``.

    Image models get a `BatchNormTrainState` (with ``batch_stats``), the others a plain
    `flax.training.train_state.TrainState`. With ``abstract=True`` every array leaf is a
    `jax.ShapeDtypeStruct` made by `jax.eval_shape`: no weight is allocated.

    Args:
        preset_or_model: a `ModelPreset` or a model instance.
        rng: PRNG key or integer seed for the initialisation (0 when None).
        batch_size: batch size of the example input used to initialise (1 when None; the
            parameters do not depend on it).
        optimizer: defaults to `default_optimizer` of the model. It is wrapped in
            `with_standard_promotion`, which changes no result.
        abstract: build shapes only.

    Example:
        >>> from alpa_lite.models.presets import get_preset
        >>> state = create_train_state(get_preset("llama2-13b"), abstract=True)
        >>> round(count_params(state.params) / 1e9, 1)
        13.0
    """
    model = _as_model(preset_or_model)
    tx = with_standard_promotion(optimizer) if optimizer is not None else default_optimizer(model)
    spec, _ = _batch_spec(model, batch_size or 1)
    inputs = spec.get("tokens", spec.get("images", spec.get("inputs")))
    init_kwargs = {"train": False} if _has_batch_norm(model) else {}

    def init(key: jax.Array) -> train_state.TrainState:
        variables = model.init(key, jnp.zeros(inputs.shape, inputs.dtype), **init_kwargs)
        if "batch_stats" in variables:
            return BatchNormTrainState.create(apply_fn=model.apply, params=variables["params"],
                                              tx=tx, batch_stats=variables["batch_stats"])
        return train_state.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                             tx=tx)

    key = _as_key(rng)
    if abstract:
        return jax.eval_shape(init, key)
    # The init program runs once, and on XLA:CPU LLVM's optimisation of the unrolled threefry
    # rounds is most of its compile time: skip it there (about 2x faster to build).
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(init, compiler_options=options)(key)


def _loss_value(loss: LossKind, outputs: jax.Array, batch: Batch) -> jax.Array:
    outputs = outputs.astype(jnp.float32)
    if loss == "mse":
        return jnp.mean((outputs - batch["targets"].astype(jnp.float32)) ** 2)
    labels = batch["targets"] if loss == "lm" else batch["labels"]
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation | None = None,
                    loss: LossKind | None = None) -> TrainStep:
    """Returns ``train_step(state, batch) -> (new_state, loss)`` (not jitted).

    Gradients come from `alpa_lite.value_and_grad` (so `parallelize` can find where computing
    gradients ends) and are applied with ``state.apply_gradients``. For BatchNorm models the
    forward pass runs in train mode and the new ``batch_stats`` (the loss's aux output) replace
    the old ones.

    Args:
        model: the flax module whose ``apply`` the state's params belong to.
        optimizer: applies the gradients instead of ``state.tx`` when given; it must be the
            optimizer the state's ``opt_state`` was made with.
        loss: ``"lm"`` (next-token cross-entropy), ``"xent"`` (classification) or ``"mse"``;
            `default_loss` of the model when None.

    Example:
        >>> from alpa_lite.models.presets import get_preset
        >>> preset = get_preset("gpt-tiny")
        >>> state = create_train_state(preset, 0)
        >>> step = jax.jit(make_train_step(build_model(preset)))
        >>> state, loss = step(state, make_batch(preset, 2))
        >>> int(state.step), loss.shape
        (1, ())
    """
    loss_kind = loss if loss is not None else default_loss(model)
    if loss_kind not in get_args(LossKind):
        raise InvalidConfigError(f"loss must be one of {get_args(LossKind)}, got {loss_kind!r}.")
    uses_batch_norm = _has_batch_norm(model)
    input_key = {"lm": "tokens", "xent": "images", "mse": "inputs"}[loss_kind]

    def loss_fn(params, batch_stats, batch):
        inputs = batch[input_key] if input_key in batch else batch["inputs"]
        if uses_batch_norm:
            variables = {"params": params, "batch_stats": batch_stats}
            outputs, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"])
            return _loss_value(loss_kind, outputs, batch), updates["batch_stats"]
        return _loss_value(loss_kind, model.apply({"params": params}, inputs), batch), None

    # Built once: the returned state must keep the input state's static fields (its ``tx``),
    # or every call would see a new pytree structure and re-plan / re-compile.
    explicit_tx = with_standard_promotion(optimizer) if optimizer is not None else None

    def train_step(state, batch):
        batch_stats = state.batch_stats if uses_batch_norm else None
        (loss_value, new_stats), grads = value_and_grad(loss_fn, has_aux=True)(
            state.params, batch_stats, batch)
        if explicit_tx is None:
            new_state = state.apply_gradients(grads=grads)
        else:
            updates, opt_state = explicit_tx.update(grads, state.opt_state, state.params)
            new_state = state.replace(step=state.step + 1, opt_state=opt_state,
                                      params=optax.apply_updates(state.params, updates))
        if uses_batch_norm:
            new_state = new_state.replace(batch_stats=new_stats)
        return new_state, loss_value

    return train_step


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s.

    Example:
        >>> count_params({"w": jnp.ones((3, 4)), "b": jax.ShapeDtypeStruct((4,), jnp.float32)})
        16
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def model_flops_per_step(preset_or_model: ModelPreset | nn.Module, batch_size: int) -> float:
    """Analytic FLOPs of one training step (forward + backward), for TFLOP/s and MFU.

    Only matrix multiplications and convolutions count (2 FLOPs per multiply-add); the backward
    pass costs twice the forward (one product for the input gradient, one for the weight
    gradient), so a step is 3x the forward. Rematerialisation's extra forward is not counted:
    these are *model* FLOPs. With batch ``B``, sequence ``s``, width ``h``, ``L`` layers,
    vocabulary ``V`` and MLP ratio ``r``:

    * GPT: ``3 B s [L ((8 + 4r) h^2 + 4 s h) + 2 h V]``; for ``r = 4`` this is Megatron-LM's
      ``72 B s L h^2 + 12 B s^2 L h + 6 B s h V`` (Narayanan et al., SC'21, §5.1). The
      ``4 s h`` term is ``Q K^T`` and ``attention @ V`` over the full (unskipped) causal square.
    * LLaMA (ffn width ``f``): ``3 B s [L (8 h^2 + 6 h f + 4 s h) + 2 h V]``.
    * Wide-ResNet: ``3 B [sum over convolutions of 2 k^2 C_in C_out H_out W_out + 2 C V]``.
    * MLP: ``6 B sum_i (in_i * out_i)``. SmallCNN: its two convolutions and Dense layer.

    Example:
        >>> from alpa_lite.models.presets import get_preset
        >>> model_flops_per_step(get_preset("gpt-tiny"), 2) == 3 * 2 * 16 * (
        ...     2 * (24 * 64**2 + 4 * 16 * 64) + 2 * 64 * 128)
        True
    """
    model = _as_model(preset_or_model)
    if isinstance(model, GPT):
        cfg = model.config
        h, s = cfg.hidden_size, cfg.seq_len
        per_layer = (8 + 4 * cfg.mlp_ratio) * h * h + 4 * s * h
        forward = batch_size * s * (cfg.num_layers * per_layer + 2 * h * cfg.vocab_size)
    elif isinstance(model, Llama):
        cfg = model.config
        h, s = cfg.hidden_size, cfg.seq_len
        per_layer = 8 * h * h + 6 * h * cfg.ffn_size + 4 * s * h
        forward = batch_size * s * (cfg.num_layers * per_layer + 2 * h * cfg.vocab_size)
    elif isinstance(model, WideResNet):
        forward = batch_size * _wide_resnet_forward_flops(model.config)
    elif isinstance(model, MLP):
        widths = [model.in_features or model.hidden] + [model.hidden] * (model.num_layers - 1)
        widths.append(model.out)
        forward = batch_size * sum(2 * a * b for a, b in zip(widths, widths[1:]))
    else:
        size, (c0, c1) = model.image_size, model.features
        per_image = 2 * 9 * (3 * c0 * size**2 + c0 * c1 * (size // 2) ** 2)
        forward = batch_size * (per_image + 2 * c1 * (size // 4) ** 2 * model.num_classes)
    return float(3 * forward)


def _wide_resnet_forward_flops(config: WideResNetConfig) -> int:
    convs = enumerate_convs(config)
    conv_flops = sum(2 * c.kernel**2 * c.in_channels * c.out_channels * c.out_size**2
                     for c in convs)
    return conv_flops + 2 * convs[-1].out_channels * config.num_classes


class Workload(NamedTuple):
    """Everything needed to run or plan one training step of a preset."""

    preset: ModelPreset
    model: nn.Module
    state: train_state.TrainState
    batch: Batch
    train_step: TrainStep
    flops_per_step: float


def build_workload(preset: ModelPreset, batch_size: int | None = None, *,
                   rng: jax.Array | int | None = None,
                   optimizer: optax.GradientTransformation | None = None,
                   abstract: bool = False) -> Workload:
    """Builds model, train state, batch, train step and model FLOPs of ``preset`` in one call.

    Example:
        >>> from alpa_lite.models.presets import get_preset
        >>> work = build_workload(get_preset("gpt-39b"), abstract=True)
        >>> work.batch["tokens"].shape, f"{work.flops_per_step:.2e}"
        ((1024, 1024), '2.51e+17')
    """
    batch_size = _resolve_batch_size(preset, batch_size)
    model = build_model(preset)
    key_state, key_batch = jax.random.split(_as_key(rng))
    return Workload(
        preset=preset,
        model=model,
        state=create_train_state(preset, key_state, batch_size, optimizer, abstract),
        batch=make_batch(preset, batch_size, key_batch, abstract),
        train_step=make_train_step(model, optimizer),
        flops_per_step=model_flops_per_step(preset, batch_size),
    )
