"""Primitive facts kept as registries keyed by primitive: operator classes (`alpa_lite.cost`),
linearity for deferred reductions (`emit/deferred.py`) and the micro-batch identities and data
movement (`batch_rules.py`)."""

import jax
import pytest
from jax.extend.core import Primitive
from jax.extend.core import primitives as prims

from alpa_lite.batch_rules import (index_operands, is_identity, register_data_movement,
                                   register_identity)
from alpa_lite.cost import (OpClass, estimate_op_cost, is_elementwise, is_fused, operator_class,
                            register_operator_class)
from alpa_lite.cost.registry import primitives_of
from alpa_lite.cost.linearity import Linearity, linearity, register_linearity
from alpa_lite.markers import grad_boundary_p, layer_boundary_p, manual_boundary_p


@pytest.mark.parametrize("primitive,classes", [
    (prims.tanh_p, OpClass.ELEMENTWISE),
    (prims.select_n_p, OpClass.ELEMENTWISE),
    (prims.transpose_p, OpClass.DATA_MOVEMENT),
    (prims.reshape_p, OpClass.DATA_MOVEMENT | OpClass.FUSED_LAYOUT),
    (layer_boundary_p, OpClass.DATA_MOVEMENT | OpClass.FUSED_LAYOUT),
    (prims.gather_p, OpClass.DATA_MOVEMENT | OpClass.KERNEL),
    (prims.dynamic_update_slice_p, OpClass.DATA_MOVEMENT | OpClass.KERNEL),
    (prims.dot_general_p, OpClass.KERNEL | OpClass.MATMUL),
    (prims.reduce_sum_p, OpClass.KERNEL | OpClass.REDUCTION),
    (prims.reduce_xor_p, OpClass.REDUCTION),
    (prims.while_p, OpClass(0)),
])
def test_operator_classes_of_known_primitives(primitive, classes):
    assert operator_class(primitive) == classes


def test_every_class_has_its_primitives():
    """Losing a class (or its registrations) empties or shrinks it."""
    counts = {cls: len(primitives_of(cls)) for cls in OpClass}
    assert counts[OpClass.ELEMENTWISE] >= 70
    assert counts[OpClass.DATA_MOVEMENT] >= 22
    assert counts[OpClass.FUSED_LAYOUT] == 7
    assert counts[OpClass.KERNEL] == 19
    assert counts[OpClass.REDUCTION] == 16
    assert set(primitives_of(OpClass.FUSED_LAYOUT)) == {
        prims.broadcast_in_dim_p, prims.reshape_p, prims.squeeze_p, prims.iota_p,
        grad_boundary_p, layer_boundary_p, manual_boundary_p}


def test_fused_and_elementwise_queries():
    assert is_fused(prims.exp_p) and is_fused(prims.broadcast_in_dim_p)
    assert not is_fused(prims.transpose_p) and not is_fused(prims.dot_general_p)
    assert is_elementwise(prims.convert_element_type_p)
    assert not is_elementwise(prims.random_bits_p)


def test_elementwise_is_derived_for_primitives_jax_batches_elementwise():
    unregistered = [p for p in (getattr(prims, n) for n in dir(prims) if n.endswith("_p"))
                    if isinstance(p, Primitive) and not operator_class(p)]
    assert not any(p.name.startswith("random_") and is_elementwise(p) for p in unregistered)
    if hasattr(prims, "one_minus_square_p"):  # jax 0.12: added without an entry of ours
        assert operator_class(prims.one_minus_square_p) is OpClass.ELEMENTWISE


def test_registering_a_class_changes_the_answers():
    new_p = Primitive("test_registry_op")
    assert operator_class(new_p) == OpClass(0) and not is_fused(new_p)
    register_operator_class(OpClass.KERNEL, new_p)
    register_operator_class(OpClass.FUSED_LAYOUT, new_p)
    assert operator_class(new_p) == OpClass.KERNEL | OpClass.FUSED_LAYOUT
    assert is_fused(new_p) and new_p in primitives_of(OpClass.KERNEL)


def test_registering_elementwise_gives_the_elementwise_cost():
    new_p = Primitive("test_registry_elementwise")
    aval = jax.core.ShapedArray((4, 5), jax.numpy.float32)
    assert estimate_op_cost(new_p, {}, [aval], [aval]).flops == 0.0  # the fallback
    register_operator_class(OpClass.ELEMENTWISE, new_p)
    assert is_elementwise(new_p)
    assert estimate_op_cost(new_p, {}, [aval], [aval]).flops == 20.0


def test_linearity_registry():
    for p in (prims.reduce_sum_p, prims.dot_general_p, prims.conv_general_dilated_p,
              prims.scatter_add_p):
        assert linearity(p) is Linearity.SUM_REDUCER
    for p in (prims.transpose_p, prims.reshape_p, prims.squeeze_p, prims.copy_p,
              prims.convert_element_type_p, prims.neg_p, prims.add_jaxvals_p, prims.add_p):
        assert linearity(p) is Linearity.LINEAR_CARRIER
    assert linearity(prims.mul_p) is None and linearity(prims.reduce_max_p) is None
    new_p = Primitive("test_registry_linear")
    register_linearity(Linearity.LINEAR_CARRIER, new_p)
    assert linearity(new_p) is Linearity.LINEAR_CARRIER
    with pytest.raises(ValueError, match="already a linear carrier"):
        register_linearity(Linearity.SUM_REDUCER, new_p)


def test_micro_batch_identities_and_data_movement():
    assert is_identity(prims.stop_gradient_p) and is_identity(grad_boundary_p)
    assert not is_identity(prims.neg_p)
    assert list(index_operands(prims.transpose_p, 1)) == []
    assert list(index_operands(prims.gather_p, 2)) == [1]
    assert list(index_operands(prims.dynamic_slice_p, 4)) == [1, 2, 3]
    assert list(index_operands(prims.dynamic_update_slice_p, 4)) == [2, 3]
    assert index_operands(prims.scatter_add_p, 3) is None
    new_p = Primitive("test_registry_move")
    register_identity(new_p)
    register_data_movement(new_p, indices_from=1)
    assert is_identity(new_p) and list(index_operands(new_p, 3)) == [1, 2]
