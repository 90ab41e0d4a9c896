"""Strategy enumeration, reshape factors, resharding costs and rule coverage."""

import jax
import jax.numpy as jnp
import pytest

from alpa_lite.graph import build_op_graph
from alpa_lite.intra_op.problem import is_transparent
from alpa_lite.intra_op.resharding import build_resharding_steps, estimate_resharding_s
from alpa_lite.intra_op.strategies import FactorRule, enumerate_factor_strategies
from alpa_lite.intra_op.strategy_rules import build_reshape_factors, has_strategy_rule
from alpa_lite.mesh import LogicalMesh

MESH = LogicalMesh(shape=(2, 4), alpha_s=(1.0, 1.0), beta_s_per_byte=(1.0, 1.0))


def test_matmul_on_2d_mesh_has_sixteen_strategies_and_reports_all_reduce():
    rule = FactorRule.parse("m k, k n -> m n", {"m": 8, "k": 8, "n": 8}, reduction="k")
    strategies = enumerate_factor_strategies(rule, MESH, 4)
    # replicated (1) + one axis on one factor (3 x 2) + the two axes on different factors
    # (3 x 2) + both axes on one factor (3) = 16; without mixed mesh shapes 13.
    assert len(strategies) == 16
    k_on_x = [s for s in strategies if s.name == "k@x->AR"]
    assert k_on_x and k_on_x[0].collectives[0].axes == ("x",)
    no_mixed = enumerate_factor_strategies(rule, MESH, 4, allow_mixed_mesh_shape=False)
    assert len(no_mixed) == 13


def test_divisibility_filters_strategies():
    rule = FactorRule.parse("m k, k n -> m n", {"m": 3, "k": 8, "n": 8}, reduction="k")
    names = [s.name for s in enumerate_factor_strategies(rule, MESH, 4)]
    assert not any("m@" in n for n in names)


@pytest.mark.parametrize("src,dst,expected", [
    ((4, 6, 8), (24, 8), (("g0", None, "g1"), ("g0", "g1"))),
    ((24, 8), (4, 6, 8), (("g0", "g1"), ("g0", None, "g1"))),
    ((2, 1, 8), (2, 8), (("g0", None, "g1"), ("g0", "g1"))),
])
def test_reshape_factors_keep_major_dims(src, dst, expected):
    in_f, out_f, _ = build_reshape_factors(src, dst)
    assert (in_f, out_f) == expected


def test_resharding_costs():
    mesh = LogicalMesh(shape=(4,), alpha_s=(1.0,), beta_s_per_byte=(1.0,))
    split, whole, other = (("x",), ()), ((), ()), ((), ("x",))
    assert estimate_resharding_s(whole, split, 1600.0, mesh) == 0.0          # slice
    assert estimate_resharding_s(split, whole, 1600.0, mesh) == pytest.approx(1 + 0.75 * 1600 + 0.1)
    all_to_all = estimate_resharding_s(split, other, 1600.0, mesh)
    assert all_to_all == pytest.approx(1 + 400 * 3 / 4 / 4 * 2)


def _change_kinds(src, dst) -> set[str]:
    where = lambda spec: {a: d for d, axes in enumerate(spec) for a in axes}  # noqa: E731
    before, after = where(src), where(dst)
    return ({"all-gather" for a in before if a not in after}
            | {"slice" for a in after if a not in before}
            | {"all-to-all" for a in before if a in after and before[a] != after[a]})


@pytest.mark.parametrize("src, dst", [
    (((), ("x",)), (("y",), ())),                    # gather x, slice y
    (((), ("x", "y")), (("x",), ())),                # x moves, y is gathered
    (((), ("x",), ("y",)), (("x", "y"), (), ())),    # two dims' axes merge
    (((), (), ("x", "y")), (("x",), ("y",), ())),    # one dim's axes spread
    ((("x",), ("y",)), (("y",), ("x",))),            # swap
])
def test_resharding_steps_change_one_kind_at_a_time_and_end_at_dst(src, dst):
    steps = build_resharding_steps(src, dst, MESH)
    assert steps[-1] == dst
    for before, after in zip((src,) + steps, steps):
        assert len(_change_kinds(before, after)) == 1, (before, after)
    # all-to-alls first (on source-sized shards), then slices, then all-gathers, as priced
    order = [_change_kinds(b, a).pop() for b, a in zip((src,) + steps, steps)]
    assert order == sorted(order, key=["all-to-all", "slice", "all-gather"].index)


def test_resharding_steps_of_a_single_kind_change_are_one_step():
    assert build_resharding_steps((("x",), ()), ((), ("x",)), MESH) == (((), ("x",)),)
    assert build_resharding_steps((("x",), ()), (("x",), ()), MESH) == ()


def test_every_primitive_of_gpt_and_cnn_steps_has_a_rule():
    from alpa_lite.models.presets import get_preset
    from alpa_lite.models.train import build_workload

    missing = set()
    for name in ("gpt-tiny", "wresnet-tiny", "llama-tiny"):
        work = build_workload(get_preset(name), abstract=True)
        graph = build_op_graph(jax.make_jaxpr(work.train_step)(work.state, work.batch))
        missing |= {n.name for n in graph.nodes
                    if not has_strategy_rule(n.primitive) and not is_transparent(n.primitive)}
    assert not missing, f"No sharding rule for: {sorted(missing)}"
