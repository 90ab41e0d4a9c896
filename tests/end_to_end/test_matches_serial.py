"""Every method equals serial jax.jit: loss, parameters and optimizer state after 3 steps.

Tolerances: fp32 intra-op rtol 1e-5 (collectives only reorder a few sums); with
micro-batches rtol 1e-4 (gradients are accumulated in a different order).

The MLP runs every method on every mesh. The BERT, CNN and GPT tests, each 10-70 s on two
cores, run each method on one mesh, a different one per model (`rotated`), so that the
three together still run every (method, mesh) pair; GPT's ShardParallel, whose ILP choice
depends most on the mesh, runs on all three.
"""

import jax
import pytest

import alpa_lite
from alpa_lite.testing import assert_trees_close

from tiny_models import cnn_step, make_bert, make_cnn, make_mlp, mse_step, run_steps

METHODS = {
    "shard": alpa_lite.ShardParallel,
    "data": alpa_lite.DataParallel,
    "zero2": alpa_lite.Zero2Parallel,
    "zero3": alpa_lite.Zero3Parallel,
}
MESHES = [(8, 1), (2, 4), (4, 2)]


def rotated(shift: int) -> list[tuple[str, tuple[int, int]]]:
    """``(method, mesh)``: method ``i`` on mesh ``i + shift`` (mod 3); shifts 0, 1 and 2
    together give every pair once."""
    return [(name, MESHES[(i + shift) % len(MESHES)]) for i, name in enumerate(METHODS)]


def pair_id(value) -> str:
    return value if isinstance(value, str) else "x".join(map(str, value))


def check_against_serial(step, state, batch, method, *, rtol, atol):
    expected_state, expected_losses = run_steps(jax.jit(step), state, batch)
    p = alpa_lite.parallelize(step, method=method)
    actual_state, actual_losses = run_steps(p, state, batch)
    assert p.num_plans == 1  # the second and third calls reuse the plan
    assert_trees_close(actual_losses, expected_losses, rtol=rtol, atol=atol)
    assert_trees_close(actual_state.params, expected_state.params, rtol=rtol, atol=atol)
    assert_trees_close(actual_state.opt_state, expected_state.opt_state, rtol=rtol, atol=atol)
    return actual_state


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("name", METHODS)
def test_mlp_matches_serial(name, mesh_shape):
    state, batch = make_mlp(64, 32, 3)
    check_against_serial(mse_step, state, batch, METHODS[name](mesh_shape=mesh_shape),
                         rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("name", ["shard", "data", "zero3"])
def test_mlp_micro_batches_match_serial(name, mesh_shape):
    state, batch = make_mlp(64, 32, 3)
    method = METHODS[name](mesh_shape=mesh_shape, num_micro_batches=4)
    check_against_serial(mse_step, state, batch, method, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "mesh_shape"), rotated(0), ids=pair_id)
def test_bert_matches_serial(name, mesh_shape):
    state, batch = make_bert(batch=8, seq=8, hidden=64, heads=4, num_layers=2)
    check_against_serial(mse_step, state, batch, METHODS[name](mesh_shape=mesh_shape,
                                                               strict=True),
                         rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "mesh_shape"), rotated(1), ids=pair_id)
def test_cnn_with_batchnorm_matches_serial(name, mesh_shape):
    state, batch = make_cnn(16)
    final = check_against_serial(cnn_step, state, batch,
                                 METHODS[name](mesh_shape=mesh_shape, strict=True),
                                 rtol=1e-5, atol=1e-6)
    expected, _ = run_steps(jax.jit(cnn_step), state, batch)
    assert_trees_close(final.batch_stats, expected.batch_stats, rtol=1e-5, atol=1e-6)


def make_gpt():
    import optax

    from alpa_lite.models.presets import get_preset
    from alpa_lite.models.train import build_workload

    # AdamW + clip_by_global_norm as in real GPT training; eps=1e-3 so that Adam's division by
    # sqrt(v) does not amplify last-bit summation-order differences of near-zero gradients.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, eps=1e-3))
    preset = get_preset("gpt-tiny").with_overrides(num_layers=2, batch_size=8)
    return build_workload(preset, optimizer=optimizer)


@pytest.mark.parametrize(("name", "mesh_shape"), rotated(2) + [
    ("shard", mesh) for mesh in MESHES if ("shard", mesh) not in rotated(2)], ids=pair_id)
def test_gpt_matches_serial(name, mesh_shape):
    work = make_gpt()
    check_against_serial(work.train_step, work.state, work.batch,
                         METHODS[name](mesh_shape=mesh_shape, strict=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [(2, 4)])
def test_gpt_micro_batches_match_serial(mesh_shape):
    work = make_gpt()
    method = alpa_lite.ShardParallel(mesh_shape=mesh_shape, num_micro_batches=2, strict=True)
    check_against_serial(work.train_step, work.state, work.batch, method, rtol=1e-4, atol=1e-5)
