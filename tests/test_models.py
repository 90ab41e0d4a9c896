"""The model zoo: tiny models train, big presets build abstractly, FLOP formulas are exact."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jex_core

from alpa_lite import models
from alpa_lite.errors import InvalidConfigError

TINY_PRESETS = ["gpt-tiny", "llama-tiny", "wresnet-tiny"]


def _assert_trains(model, state, batch, loss=None):
    """Three jitted steps on one batch: the loss must drop and BatchNorm statistics must move."""
    # Tiny models run in microseconds; unoptimised XLA:CPU code halves the compile time.
    step = jax.jit(models.make_train_step(model, loss=loss),
                   compiler_options={"xla_backend_optimization_level": 0})
    new_state, losses = state, []
    for _ in range(3):
        new_state, loss_value = step(new_state, batch)
        losses.append(float(loss_value))
    assert losses[2] < losses[0], f"losses {losses} did not decrease"
    assert int(new_state.step) == 3
    if isinstance(state, models.BatchNormTrainState):
        old_stats = jax.tree_util.tree_leaves(state.batch_stats)
        new_stats = jax.tree_util.tree_leaves(new_state.batch_stats)
        assert not all(jnp.allclose(a, b) for a, b in zip(old_stats, new_stats)), (
            "batch_stats were not updated")


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_trains(name):
    preset = models.get_preset(name)
    state = models.create_train_state(preset, 0, 4)
    assert models.count_params(state.params) == preset.nominal_params
    _assert_trains(models.build_model(preset), state, models.make_batch(preset, 4, rng=1))


@pytest.mark.parametrize(
    "model, loss",
    [(models.MLP(hidden=16, num_layers=6, out=4, in_features=8), "mse"),
     (models.SmallCNN(num_classes=10, features=(4, 8), image_size=8), "xent")],
    ids=["mlp", "cnn"],
)
def test_small_model_trains(model, loss):
    state = models.create_train_state(model, 0, 8)
    _assert_trains(model, state, models.make_batch(model, 8, rng=1), loss=loss)


def test_six_layer_mlp_has_six_dense_layers_with_bias():
    state = models.create_train_state(models.MLP(hidden=16, num_layers=6, out=4), 0, abstract=True)
    assert sorted(state.params) == [f"dense_{i}" for i in range(6)]
    assert all(set(layer) == {"kernel", "bias"} for layer in state.params.values())


@pytest.mark.parametrize("name", TINY_PRESETS + ["cnn"])
def test_bfloat16_compute_traces_under_strict_promotion(name):
    # Tracing is enough: strict dtype promotion errors are raised while tracing.
    if name == "cnn":
        model, preset = models.SmallCNN(dtype=jnp.bfloat16), None
    else:
        preset = models.get_preset(name)
        config = dataclasses.replace(preset.config, dtype=jnp.bfloat16)
        model = type(models.build_model(preset))(config)
    state = models.create_train_state(model, 0, 2, abstract=True)
    batch = models.make_batch(model, 2, abstract=True)
    new_state, loss = jax.eval_shape(models.make_train_step(model), state, batch)
    assert loss.dtype == jnp.float32
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    inputs = batch.get("tokens", batch.get("images"))
    variables = {"params": state.params}
    if isinstance(state, models.BatchNormTrainState):
        variables["batch_stats"] = state.batch_stats
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, **(
        {"train": False} if "batch_stats" in v else {})), variables, inputs)
    assert logits.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_language_model_blocks_are_named_and_remat_keeps_the_names(name):
    preset = models.get_preset(name)
    model = type(models.build_model(preset))(dataclasses.replace(preset.config, remat=True))
    state = models.create_train_state(model, 0, 2, abstract=True)
    assert [k for k in state.params if k.startswith("block_")] == ["block_0", "block_1"]
    jaxpr = jax.make_jaxpr(models.make_train_step(model))(
        state, models.make_batch(preset, 2, abstract=True))
    assert "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


def test_wide_resnet_names_stages():
    state = models.create_train_state(models.get_preset("wresnet-tiny"), 0, abstract=True)
    assert [k for k in state.params if k.startswith("stage_")] == ["stage_0", "stage_1", "stage_2"]


@pytest.mark.parametrize("name, nominal", [("llama2-13b", 13e9), ("gpt-39b", 39e9)])
def test_big_preset_builds_abstract_state_without_allocating(name, nominal):
    state = models.create_train_state(models.get_preset(name), 0, abstract=True)
    leaves = jax.tree_util.tree_leaves(state)
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    num_params = models.count_params(state.params)
    assert abs(num_params / nominal - 1) < 0.05, f"{name}: {num_params:,} vs nominal {nominal:,.0f}"
    batch = models.make_batch(models.get_preset(name), 2, abstract=True)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in batch.values())


@pytest.mark.parametrize("name", list(models.PRESETS))
def test_every_preset_is_within_five_percent_of_its_nominal_size(name):
    preset = models.get_preset(name)
    estimate = {"gpt": models.estimate_gpt_params, "llama": models.estimate_llama_params,
                "wresnet": models.estimate_wide_resnet_params}[preset.family]
    assert abs(estimate(preset.config) / preset.nominal_params - 1) < 0.05


def test_get_preset_error_lists_valid_names():
    with pytest.raises(InvalidConfigError, match="gpt-1.3b.*llama2-13b.*wresnet-250m"):
        models.get_preset("gpt-7b")


def test_with_overrides_changes_only_what_is_asked():
    preset = models.get_preset("gpt-1.3b").with_overrides(num_layers=2, seq_len=128)
    assert (preset.config.num_layers, preset.config.seq_len, preset.config.hidden_size) == (
        2, 128, 2048)
    assert preset.default_batch_size == models.get_preset("gpt-1.3b").default_batch_size
    assert models.get_preset("wresnet-1b").with_overrides(num_layers=101).config.stage_sizes == (
        3, 4, 23, 3)
    with pytest.raises(InvalidConfigError, match="no seq_len"):
        models.get_preset("wresnet-1b").with_overrides(seq_len=8)
    with pytest.raises(InvalidConfigError, match="depth"):
        models.get_preset("wresnet-1b").with_overrides(num_layers=51)


def test_gpt_flops_match_hand_formula():
    # gpt-tiny: B=2, s=16, L=2, h=64, V=128. Megatron-LM (Narayanan et al. 2021):
    # 72 B s L h^2 + 12 B s^2 L h + 6 B s h V.
    batch, seq, layers, hidden, vocab = 2, 16, 2, 64, 128
    expected = (72 * batch * seq * layers * hidden**2 + 12 * batch * seq**2 * layers * hidden
                + 6 * batch * seq * hidden * vocab)
    assert expected == 21_233_664
    assert models.model_flops_per_step(models.get_preset("gpt-tiny"), batch) == expected


def _sub_jaxprs(eqn):
    for param in eqn.params.values():
        for value in param if isinstance(param, (tuple, list)) else (param,):
            if isinstance(value, jex_core.ClosedJaxpr):
                yield value.jaxpr
            elif isinstance(value, jex_core.Jaxpr):
                yield value


def _matmul_flops(jaxpr):
    """2 x multiply-adds of every dot_general / conv in ``jaxpr``, recursing into sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        out = eqn.outvars[0].aval
        if eqn.primitive.name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2 * out.size * math.prod(lhs.shape[d] for d in lhs_contracting)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            per_output = math.prod(rhs.shape[d] for d in spec[1:])
            # A transposed strided convolution (input gradient) dilates its input with zeros;
            # only 1 / prod(lhs_dilation) of its taps are real multiply-adds.
            dilation = math.prod(eqn.params["lhs_dilation"])
            total += 2 * out.size * per_output // (eqn.params["feature_group_count"] * dilation)
        for sub in _sub_jaxprs(eqn):
            total += _matmul_flops(sub)
    return total


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_language_model_flops_equal_matmul_flops_of_the_traced_step(name):
    # Every matmul of a transformer needs both its input and weight gradient, so the traced
    # step's dot_general FLOPs are exactly 3x the forward's: the formula must match exactly.
    preset = models.get_preset(name)
    state = models.create_train_state(preset, 0, 2, abstract=True)
    step = models.make_train_step(models.build_model(preset))
    jaxpr = jax.make_jaxpr(step)(state, models.make_batch(preset, 2, abstract=True))
    assert _matmul_flops(jaxpr.jaxpr) == models.model_flops_per_step(preset, 2)


def test_wide_resnet_flops_match_traced_step_up_to_the_stem_input_gradient():
    # The stem convolution's input gradient (w.r.t. the images) is never computed, so the traced
    # step is short of the 3x-forward formula by exactly one stem forward.
    preset = models.get_preset("wresnet-tiny")
    config = preset.config
    state = models.create_train_state(preset, 0, 2, abstract=True)
    step = models.make_train_step(models.build_model(preset))
    jaxpr = jax.make_jaxpr(step)(state, models.make_batch(preset, 2, abstract=True))
    stem_forward = 2 * 2 * 9 * 3 * config.base_channels * config.image_size**2
    assert _matmul_flops(jaxpr.jaxpr) == models.model_flops_per_step(preset, 2) - stem_forward
