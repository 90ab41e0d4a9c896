"""Layer construction: markers are mirrored into the backward pass and change no result."""

import jax
import jax.numpy as jnp
import numpy as np

import alpa_lite
from alpa_lite.config import AutoLayerOption, ManualLayerOption
from alpa_lite.layers import build_layer_transform
from alpa_lite.markers import layer_boundary_p, layer_construction


def loss(params, x):
    for i, w in enumerate(params):
        if i:
            alpa_lite.mark_pipeline_boundary()
        x = jnp.tanh(x @ w)
    return jnp.mean(x ** 2)


def make():
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.normal(size=(8, 8)), jnp.float32) for _ in range(4)]
    return params, jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)


def markers_of(option):
    params, x = make()
    transform = build_layer_transform(option)
    with layer_construction(transform):
        jaxpr = jax.make_jaxpr(alpa_lite.grad(loss))(params, x)
    return [(e.params["layer"], e.params["kind"], e.params["backward"])
            for e in jaxpr.eqns if e.primitive is layer_boundary_p], transform.record


def test_manual_layers_are_mirrored_in_backward():
    marks, record = markers_of(ManualLayerOption())
    assert record.num_layers == 4 and len(record.starts) == 4
    forward = [m for m in marks if not m[2]]
    backward = [m for m in marks if m[2]]
    assert forward == [(i, k, False) for i in range(4) for k in ("start", "end")]
    # Backward layers run in reverse; each backward region opens with the mirrored "start".
    assert [m[0] for m in backward if m[1] == "start"] == [3, 2, 1, 0]


def test_auto_layers_pick_requested_count():
    marks, record = markers_of(AutoLayerOption(layer_num=2))
    assert record.num_layers == 2 and len(record.starts) == 2
    assert {m[0] for m in marks} == {0, 1}


def test_markers_do_not_change_gradients():
    params, x = make()
    expected = jax.jit(jax.grad(loss))(params, x)
    with layer_construction(build_layer_transform(AutoLayerOption(layer_num=4))):
        actual = jax.jit(alpa_lite.grad(loss))(params, x)
    alpa_lite.testing.assert_trees_close(actual, expected, rtol=0, atol=0)
