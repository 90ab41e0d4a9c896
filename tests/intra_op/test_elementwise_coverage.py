"""Every elementwise operator of the installed jax gets a sharding rule, new ones included.

The operators are found by what they do on this jax (one equation, results of the operand's
shape, no dimension parameters), not from our own list, so a primitive a future jax adds is
covered by this test the day it appears.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

import alpa_lite
from alpa_lite.intra_op.strategy_rules import StrategyContext, build_node_rule
from alpa_lite.intra_op.strategies import FactorRule

SHAPE = (8, 16)
_DIMENSION_PARAMS = {"axis", "axes", "dimension", "dimensions", "shape", "new_sizes",
                     "broadcast_dimensions", "permutation", "start_indices", "limit_indices"}

# Shape-preserving primitives that are no operators: the remat barrier (the graph keeps it as
# a barrier of its own) and RNG key primitives (replicated on purpose).
_NOT_OPERATORS = {"optimization_barrier", "random_seed", "random_wrap", "random_unwrap",
                  "random_clone"}


def _single_equation(fn, *avals):
    try:
        closed = jax.make_jaxpr(fn)(*avals)
    except Exception:  # wrong arity, dtype or domain: not this kind of operator
        return None
    if len(closed.jaxpr.eqns) != 1:
        return None
    eqn = closed.jaxpr.eqns[0]
    if any(isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr))
           for v in eqn.params.values()):
        return None  # a call or a control-flow primitive
    if _DIMENSION_PARAMS & set(eqn.params) or eqn.primitive.name in _NOT_OPERATORS:
        return None
    if not eqn.outvars or [getattr(v.aval, "shape", None) for v in eqn.outvars] != [SHAPE] * len(
            eqn.outvars):
        return None
    return eqn


def _lax_elementwise_functions():
    """(name, function, operand dtype, arity) for every jax.lax function that is one
    elementwise equation on float or integer operands of one shape."""
    found = {}
    for name in sorted(dir(jax.lax)):
        fn = getattr(jax.lax, name)
        if name.startswith("_") or not callable(fn) or inspect.isclass(fn):
            continue
        for dtype in (jnp.float32, jnp.int32, jnp.bool_):
            for arity in (1, 2, 3):
                aval = jax.ShapeDtypeStruct(SHAPE, dtype)
                eqn = _single_equation(fn, *[aval] * arity)
                if eqn is not None and eqn.primitive not in found:
                    found[eqn.primitive] = (name, fn, dtype, arity)
                    break
            else:
                continue
            break
    return list(found.values())


def _nn_activations():
    """(name, function) for every jax.nn function that maps an array to one of its shape."""
    found = []
    x = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
    for name in sorted(dir(jax.nn)):
        fn = getattr(jax.nn, name)
        if name.startswith("_") or not callable(fn) or inspect.isclass(fn):
            continue
        try:
            out = jax.eval_shape(fn, x)
        except Exception:
            continue
        if getattr(out, "shape", None) == SHAPE:
            found.append((name, fn))
    return found


LAX = _lax_elementwise_functions()
ACTIVATIONS = _nn_activations()


def test_the_discovery_finds_the_operators_every_jax_has():
    names = {name for name, *_ in LAX}
    assert len(LAX) >= 40, names
    assert {"tanh", "exp", "add", "mul", "max", "select", "bitwise_and", "shift_left"} <= names
    assert {"relu", "gelu", "silu", "sigmoid", "softplus"} <= {n for n, _ in ACTIVATIONS}


@pytest.mark.parametrize("name,fn,dtype,arity", LAX, ids=[entry[0] for entry in LAX])
def test_lax_elementwise_operator_has_a_splitting_rule(name, fn, dtype, arity):
    aval = jax.ShapeDtypeStruct(SHAPE, dtype)
    eqn = _single_equation(fn, *[aval] * arity)
    ctx = StrategyContext(primitive=eqn.primitive, params=dict(eqn.params),
                          avals_in=tuple(v.aval for v in eqn.invars),
                          avals_out=tuple(v.aval for v in eqn.outvars))
    rule = build_node_rule(ctx)
    assert isinstance(rule, FactorRule), f"{eqn.primitive.name} ({name}) has no factor rule"
    # Every operand and result can be split along both dims.
    assert all(None not in dims for dims in rule.operands + rule.results), rule


def test_a_step_with_every_elementwise_operator_and_activation_is_planned_without_fallback():
    float_ops = [fn for _, fn, dtype, arity in LAX if dtype is jnp.float32]
    arities = [arity for _, _, dtype, arity in LAX if dtype is jnp.float32]
    other = [(fn, dtype, arity) for _, fn, dtype, arity in LAX if dtype is not jnp.float32]

    def step(w, batch):
        def loss(w):
            h = batch["x"] @ w
            total = 0.0
            for _, act in ACTIVATIONS:
                total = total + act(h).sum()
            return total
        value, grad = jax.value_and_grad(loss)(w)
        h = batch["x"] @ w
        outs = [fn(*[h] * arity) for fn, arity in zip(float_ops, arities)]
        outs += [fn(*[batch[np.dtype(dtype).name]] * arity) for fn, dtype, arity in other]
        return w - 0.1 * grad, value, outs

    batch = {"x": jax.ShapeDtypeStruct((SHAPE[0], 32), jnp.float32),
             "int32": jax.ShapeDtypeStruct(SHAPE, jnp.int32),
             "bool": jax.ShapeDtypeStruct(SHAPE, jnp.bool_)}
    w = jax.ShapeDtypeStruct((32, SHAPE[1]), jnp.float32)
    method = alpa_lite.ShardParallel(mesh_shape=(2, 4), strict=True)
    plan = alpa_lite.parallelize(step, method=method).plan(w, batch)  # strict: no fallback
    assert not plan.sharding.fallback_primitives
