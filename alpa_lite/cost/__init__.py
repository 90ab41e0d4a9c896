"""Cost model: per-primitive compute/memory rules, operator classes and alpha-beta collective
times."""

from alpa_lite.cost import rules as _rules  # noqa: F401  (populates the registries)
from alpa_lite.cost.collectives import Collective, estimate_collective_s
from alpa_lite.cost.registry import (OpClass, OpCost, compute_dtype_name, estimate_op_cost,
                                    has_cost_rule, is_elementwise, is_fused, nbytes,
                                    operator_class, register_cost_rule, register_operator_class)

__all__ = ["Collective", "OpClass", "OpCost", "compute_dtype_name", "estimate_collective_s",
           "estimate_op_cost", "has_cost_rule", "is_elementwise", "is_fused", "nbytes",
           "operator_class", "register_cost_rule", "register_operator_class"]
