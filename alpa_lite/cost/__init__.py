"""Cost model: per-primitive compute/memory rules and alpha-beta collective times."""

from alpa_lite.cost import rules as _rules  # noqa: F401  (populates the registry)
from alpa_lite.cost.collectives import Collective, estimate_collective_s
from alpa_lite.cost.registry import (OpCost, compute_dtype_name, estimate_op_cost, has_cost_rule,
                                    nbytes, register_cost_rule)

__all__ = ["Collective", "OpCost", "compute_dtype_name", "estimate_collective_s",
           "estimate_op_cost", "has_cost_rule", "nbytes", "register_cost_rule"]
