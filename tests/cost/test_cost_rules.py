"""Cost rules and collective formulas against hand-derived numbers."""

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import primitives as prims

from alpa_lite.cost import Collective, estimate_collective_s, estimate_op_cost, register_cost_rule
from alpa_lite.mesh import LogicalMesh


def eqn_cost(fun, *args):
    eqn = jax.make_jaxpr(fun)(*args).eqns[0]
    return estimate_op_cost(eqn.primitive, eqn.params, [v.aval for v in eqn.invars],
                            [v.aval for v in eqn.outvars])


def test_dot_general_cost_is_2mkn():
    cost = eqn_cost(jnp.matmul, jnp.ones((3, 7)), jnp.ones((7, 5)))
    assert cost.flops == 2 * 3 * 7 * 5
    assert cost.hbm_bytes == 4 * (3 * 7 + 7 * 5 + 3 * 5)


def test_conv_cost_counts_window_and_input_features():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    fun = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert eqn_cost(fun, x, w).flops == 2 * (2 * 8 * 8 * 4) * (3 * 3) * 3


def test_elementwise_and_reduction_costs():
    assert eqn_cost(jnp.exp, jnp.ones((4, 5))).flops == 20
    assert eqn_cost(lambda x: jnp.sum(x, axis=1), jnp.ones((4, 5))).flops == 20


@pytest.mark.parametrize("kind,factor", [
    (Collective.ALL_REDUCE, 2 * 3 / 4), (Collective.ALL_GATHER, 3 / 4),
    (Collective.REDUCE_SCATTER, 3 / 4), (Collective.ALL_TO_ALL, 3 / 4 / 4 * 2),
])
def test_collective_alpha_beta_formulas(kind, factor):
    mesh = LogicalMesh(shape=(4, 2), alpha_s=(2.0, 1.0), beta_s_per_byte=(0.5, 1.0))
    tie = {Collective.ALL_REDUCE: 0.01, Collective.ALL_GATHER: 0.1,
           Collective.REDUCE_SCATTER: 0.001, Collective.ALL_TO_ALL: 0.0}[kind]
    expected = 2.0 + 0.5 * factor * 1000 + 2.0 * tie
    assert estimate_collective_s(kind, mesh, ("x",), 1000) == pytest.approx(expected)


def test_collective_on_size_one_axis_is_free():
    mesh = LogicalMesh(shape=(8, 1))
    assert estimate_collective_s(Collective.ALL_REDUCE, mesh, ("y",), 1e6) == 0.0


def test_duplicate_cost_rule_is_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_cost_rule(prims.add_p)(lambda ctx, **_: None)
