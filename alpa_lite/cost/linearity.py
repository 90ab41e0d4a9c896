"""Linearity of primitives for deferred reductions: which cross-device sums may be postponed
from every micro-batch to once per step, and which operators a partial sum may pass through
on its way to the gradient boundary. The runtime (`emit/deferred.py`) defers exactly these;
the pricing (`intra_op/once_per_step.py`) prices exactly these once per step.
"""

from __future__ import annotations

import enum

from jax.extend.core import primitives as prims


class Linearity(enum.Enum):
    """What a primitive does to partial sums, as far as deferring a reduction goes."""

    # Its cross-device reduction is a sum (and so can be postponed and summed once).
    SUM_REDUCER = "sum reducer"
    # Linear: a partial sum may pass through it on its way to the gradient boundary.
    LINEAR_CARRIER = "linear carrier"


_LINEARITY: dict[object, Linearity] = {}


def register_linearity(kind: Linearity, *primitives) -> None:
    """Registers ``kind`` for ``primitives`` (objects, not names); one kind per primitive."""
    for primitive in primitives:
        if _LINEARITY.get(primitive, kind) is not kind:
            raise ValueError(f"{primitive.name!r} is already a {_LINEARITY[primitive].value}.")
        _LINEARITY[primitive] = kind


def linearity(primitive) -> Linearity | None:
    """The registered `Linearity` of ``primitive``; None: a reduction through it is not
    deferred."""
    return _LINEARITY.get(primitive)


register_linearity(Linearity.SUM_REDUCER, prims.reduce_sum_p, prims.dot_general_p,
                   prims.conv_general_dilated_p, prims.scatter_add_p)
register_linearity(Linearity.LINEAR_CARRIER, prims.transpose_p, prims.reshape_p,
                   prims.squeeze_p, prims.copy_p, prims.convert_element_type_p, prims.neg_p,
                   prims.add_jaxvals_p, prims.add_p)
