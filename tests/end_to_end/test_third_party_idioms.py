"""Train steps written the way third-party libraries write them run unmodified.

Each model of `idiom_models` is differentiated with its library's own `value_and_grad`
(no `alpa_lite.value_and_grad`): micro-batching finds the gradient boundary itself, and a
3-step training loop with fresh host batches equals serial `jax.jit` (SGD with momentum,
so equality is exact up to summation order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import alpa_lite
from alpa_lite.testing import assert_trees_close

from idiom_models import IDIOMS, OPT, explicit_sharding_mesh

RTOL, ATOL = 2e-5, 2e-6


def _serial_loop(step, state, batches):
    jitted, results = jax.jit(step), []
    for batch in batches:
        state, loss = jitted(state, batch)
        results.append((state, loss))
    return results


def _train_and_compare(step, state, batches, method):
    """A training loop under ``method``: after every step, state and loss equal jax.jit's."""
    expected = _serial_loop(step, state, batches)
    parallel = alpa_lite.parallelize(step, method=method)
    for batch, want in zip(batches, expected):
        state, loss = parallel(state, batch)
        assert_trees_close((state, loss), want, rtol=RTOL, atol=ATOL)
    return parallel, state


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_unmodified_step_with_micro_batches_equals_jax_jit(name):
    step, state, batches = IDIOMS[name]()
    method = alpa_lite.ShardParallel(mesh_shape=(2, 4), num_micro_batches=2, strict=True)
    parallel, state = _train_and_compare(step, state, batches, method)
    # The plan accumulates gradients: the update runs once, after 2 micro-batches.
    assert parallel.plan(state, batches[0]).num_micro_batches == 2


@pytest.mark.parametrize("name", sorted(IDIOMS))
def test_unmodified_step_in_an_auto_layered_pipeline_equals_jax_jit(name):
    """jax.value_and_grad steps pipelined: layers are built on the differentiated program
    (`alpa_lite.auto_layers`), 2 stages, 2 micro-batches, 3 steps."""
    step, state, batches = IDIOMS[name]()
    method = alpa_lite.PipeshardParallel(
        num_micro_batches=2, layer_option=alpa_lite.AutoLayerOption(layer_num=2),
        stage_option="uniform")
    parallel, state = _train_and_compare(step, state, batches, method)
    plan = parallel.plan(state, batches[0])
    assert len(plan.stages) == 2 and plan.extra.layers.automatic


def _mlp_state():
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(8, 16)).astype(np.float32) * 0.3,
              "w2": rng.normal(size=(16, 4)).astype(np.float32) * 0.3}
    return params, OPT.init(params)


def _mlp_batches(n=3):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(16, 8)).astype(np.float32),
             "y": rng.normal(size=(16, 4)).astype(np.float32)} for _ in range(n)]


def _mlp_step(value_and_grad):
    def step(state, batch):
        params, opt_state = state

        def loss_fn(params):
            h = jnp.tanh(batch["x"] @ params["w1"])
            alpa_lite.mark_pipeline_boundary()
            return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)

        loss, grads = value_and_grad(loss_fn)(params)
        updates, opt_state = OPT.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def test_a_sum_loss_accumulates_as_a_sum_and_a_mean_loss_as_a_mean():
    """Gradients are classified from the program (no loss role): a sum loss's gradients
    add up over micro-batches, a mean loss's average."""
    for reduce in (jnp.sum, jnp.mean):
        def step(params, batch):
            loss, grads = jax.value_and_grad(
                lambda p: reduce((jnp.tanh(batch["x"] @ p) - 0.5) ** 2))(params)
            return params - 0.01 * grads, loss

        params = np.ones((8, 4), np.float32) * 0.1
        batch = _mlp_batches(1)[0]
        expected = jax.jit(step)(params, batch)
        method = alpa_lite.DataParallel(mesh_shape=(4,), num_micro_batches=4)
        assert_trees_close(alpa_lite.parallelize(step, method=method)(params, batch), expected,
                           rtol=RTOL, atol=ATOL)


METHODS = {
    "shard": lambda: alpa_lite.ShardParallel(mesh_shape=(2, 4)),
    "shard_micro_batches": lambda: alpa_lite.ShardParallel(mesh_shape=(2, 4),
                                                           num_micro_batches=2),
    "data": lambda: alpa_lite.DataParallel(),
    "zero2": lambda: alpa_lite.Zero2Parallel(),
    "zero3": lambda: alpa_lite.Zero3Parallel(),
    "pipeline": lambda: alpa_lite.PipeshardParallel(
        num_micro_batches=2, layer_option="manual", stage_option="uniform"),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_training_loop_compiles_its_step_once_as_jax_jit_does(name):
    """Steps 2 and 3 of a loop with fresh host batches compile nothing, for jax.jit and for
    every method (the first call placing the batch used to make jax compile again)."""
    compiles = []

    def listener(event, _seconds, **_):
        if "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        value_and_grad = alpa_lite.value_and_grad if name == "pipeline" else jax.value_and_grad
        step = _mlp_step(value_and_grad)
        for run in (jax.jit(step), alpa_lite.parallelize(step, method=METHODS[name]())):
            state, per_step = _mlp_state(), []
            for batch in _mlp_batches():
                before = len(compiles)
                state, loss = run(state, batch)
                float(loss)
                per_step.append(len(compiles) - before)
            assert per_step[0] >= 1 and per_step[1:] == [0, 0], (run, per_step)
    finally:
        jax.monitoring.clear_event_listeners()


def test_batchnorm_in_training_mode_is_an_error_naming_the_primitive_and_line():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.BatchNorm(use_running_average=False)(nn.Dense(8)(x)))

    net = Net()
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    variables = net.init(jax.random.key(0), x)

    def step(params, batch):
        def loss_fn(params):
            out, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]},
                               batch, mutable=["batch_stats"])
            return jnp.mean(out ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    method = alpa_lite.DataParallel(mesh_shape=(4,), num_micro_batches=2)
    with pytest.raises(alpa_lite.InvalidConfigError) as info:
        alpa_lite.parallelize(step, method=method).plan(variables["params"], x)
    message = str(info.value)
    assert "batch statistics" in message and "could not be followed through `" in message
    assert "normalization.py" in message  # the source line where the batch was mixed back


def test_a_jax_value_and_grad_pipeline_with_manual_boundaries():
    method = alpa_lite.PipeshardParallel(num_micro_batches=2, layer_option="manual",
                                         stage_option="uniform")
    parallel, state = _train_and_compare(_mlp_step(jax.value_and_grad), _mlp_state(),
                                         _mlp_batches(), method)
    plan = parallel.plan(state, _mlp_batches(1)[0])
    assert len(plan.stages) == 2 and plan.extra.layers.num_layers == 2


def test_rematerialized_layers_of_a_jax_value_and_grad_step_say_what_to_change():
    method = alpa_lite.PipeshardParallel(num_micro_batches=2, layer_option=alpa_lite.
                                         ManualLayerOption(remat_layer=True))
    with pytest.raises(alpa_lite.InvalidConfigError, match="alpa_lite.value_and_grad"):
        alpa_lite.parallelize(_mlp_step(jax.value_and_grad), method=method).plan(
            _mlp_state(), _mlp_batches(1)[0])


@pytest.mark.parametrize("method", [
    alpa_lite.ShardParallel(mesh_shape=(2, 4)),
    alpa_lite.ShardParallel(mesh_shape=(2, 4), num_micro_batches=2),
    alpa_lite.DataParallel(), alpa_lite.Zero3Parallel(),
    alpa_lite.PipeshardParallel(num_micro_batches=2, stage_option="uniform",
                                layer_option=alpa_lite.AutoLayerOption(layer_num=2))],
    ids=["shard", "micro", "dp", "zero3", "pipeline"])
def test_a_model_written_for_an_explicit_sharding_mesh_runs_and_equals_jax_jit(method):
    """`reshard` and `out_sharding=` name the user's mesh: the plan treats them as hints it
    replaces, and runs on its own mesh whatever mesh the caller has set."""
    mesh, step, state, batches = explicit_sharding_mesh()
    with jax.set_mesh(mesh):
        _train_and_compare(step, state, batches, method)


def test_the_ilp_splits_a_moe_layers_expert_dim_when_memory_requires_it():
    """Expert parallelism found by the planner: a top-2 MoE whose stacked expert weights do
    not fit replicated gets them split along the expert dim (the only dim that splits 8
    ways), with no hand-written local_map, and equals jax.jit."""
    experts, d, f, tokens = 8, 4, 6, 16

    def loss_fn(params, batch):
        x = batch["x"]
        gates, index = jax.lax.top_k(jax.nn.softmax(x @ params["router"]), 2)
        combine = jnp.einsum("tke,tk->te", jax.nn.one_hot(index, experts), gates)
        h = jax.nn.silu(jnp.einsum("td,edf->tef", x, params["w_in"]))
        y = jnp.einsum("tef,efd->ted", h, params["w_out"])
        return jnp.mean((jnp.einsum("ted,te->td", y, combine) - batch["y"]) ** 2)

    def step(params, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    rng = np.random.default_rng(0)
    params = {"router": rng.normal(size=(d, experts)).astype(np.float32),
              "w_in": rng.normal(size=(experts, d, f)).astype(np.float32),
              "w_out": rng.normal(size=(experts, f, d)).astype(np.float32)}
    batch = {"x": rng.normal(size=(tokens, d)).astype(np.float32),
             "y": rng.normal(size=(tokens, d)).astype(np.float32)}
    unbounded = alpa_lite.parallelize(step, method=alpa_lite.ShardParallel(
        mesh_shape=(8,), strict=True)).plan(params, batch)
    budget = 0.9 * unbounded.sharding.peak_memory_bytes  # replicated experts no longer fit
    method = alpa_lite.ShardParallel(mesh_shape=(8,), strict=True,
                                     memory_budget_per_device=budget)
    parallel = alpa_lite.parallelize(step, method=method)
    specs = dict(zip(parallel.plan(params, batch).sharding.input_names,
                     parallel.plan(params, batch).sharding.input_specs))
    assert specs["arg0['w_in']"][0] == ("x",) and specs["arg0['w_out']"][0] == ("x",), specs
    assert_trees_close(parallel(params, batch), jax.jit(step)(params, batch), rtol=RTOL, atol=ATOL)


def test_structural_primitives_micro_batch_exactly():
    """stack / unstack, split / concatenate, cumsum, sort, argmax and a tiled constant on
    per-example values, with per-example and reduced aux values, equal jax.jit."""

    def loss_fn(w, x):
        h = jnp.tanh(x @ w)                                   # b f
        a, b = jnp.split(h, 2, axis=1)
        stacked = jnp.stack([a, b * 2.0], axis=1)             # b 2 f/2
        first, second = jnp.unstack(stacked, axis=1)
        mixed = jnp.concatenate([jnp.cumsum(first, axis=1), jnp.sort(second, axis=1)], axis=1)
        mixed = mixed + jnp.tile(w[:1, :], (x.shape[0], 1))
        per_example = jnp.sum(mixed ** 2, axis=1)
        return jnp.mean(per_example), {"best": jnp.argmax(mixed, axis=1),
                                       "per_example": per_example, "total": per_example.sum()}

    def step(w, x):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(w, x)
        return w - 0.1 * grads, loss, aux

    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8)).astype(np.float32) * 0.5
    x = rng.normal(size=(16, 8)).astype(np.float32)
    method = alpa_lite.ShardParallel(mesh_shape=(2, 4), num_micro_batches=4, strict=True)
    assert_trees_close(alpa_lite.parallelize(step, method=method)(w, x), jax.jit(step)(w, x),
                       rtol=RTOL, atol=ATOL)
