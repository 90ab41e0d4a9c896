"""The gradient split of a train step: what runs once before, per micro-batch, and once after
`alpa_lite.grad`'s boundary. Both the planner (pricing a pipeline's stages) and the runtime
(gradient accumulation, pipeline programs) use it."""

from __future__ import annotations

import dataclasses

from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import OpGraph
from alpa_lite.markers import grad_boundary_p


@dataclasses.dataclass(frozen=True)
class GradSplit:
    """The nodes of a train step split around the gradient boundary.

    Attributes:
        pre: nodes that do not depend on the batch or the boundary (run once, before).
        compute: batch-dependent nodes up to the boundary (run per micro-batch).
        post: nodes that depend on the boundary's outputs (run once, after).
        boundary: index of the grad_boundary node.
    """

    pre: tuple[int, ...]
    compute: tuple[int, ...]
    post: tuple[int, ...]
    boundary: int


def split_at_grad_boundary(graph: OpGraph, batch_inputs: list[int],
                           per_micro_batch_nodes=()) -> GradSplit:
    """Splits ``graph`` around its single `grad_boundary` node.

    ``per_micro_batch_nodes`` (e.g. random draws with a batch-sized shape) run once per
    micro-batch even though they read no batch input.

    Raises:
        InvalidConfigError: no boundary (the step does not use alpa_lite.grad), several, or
            the batch is used after the boundary other than through its outputs.
    """
    boundaries = [n.index for n in graph.nodes if n.primitive is grad_boundary_p]
    if len(boundaries) != 1:
        raise InvalidConfigError(
            f"Micro-batching needs exactly one alpa_lite.grad / alpa_lite.value_and_grad call in "
            f"the step; found {len(boundaries)}. Compute gradients with alpa_lite.value_and_grad "
            "(a drop-in for jax.value_and_grad), or set num_micro_batches=None."
        )
    boundary = boundaries[0]
    batch_dep = set(batch_inputs)
    after = set(graph.nodes[boundary].outvars)
    per_micro_batch = set(per_micro_batch_nodes) | _batch_carries(graph, batch_dep,
                                                                   per_micro_batch_nodes)
    pre, compute, post = [], [], []
    for node in graph.nodes:
        ins = {v for v in node.invars if isinstance(v, int)}
        uses_batch = bool(ins & batch_dep) or node.index in per_micro_batch
        uses_after = bool(ins & after)
        if node.index == boundary:
            compute.append(node.index)
        elif uses_batch and uses_after:
            raise InvalidConfigError(
                f"Operator {node.name} (#{node.index}) combines a per-micro-batch value with the "
                "gradients; return such values from the loss function as aux so they are "
                "averaged over micro-batches.")
        elif uses_batch:
            if node.index > boundary:
                raise InvalidConfigError(
                    f"Operator {node.name} (#{node.index}) uses the batch after the gradient "
                    "boundary; with micro-batches only values computed inside "
                    "alpa_lite.value_and_grad (returned as value or aux) may depend on the batch.")
            batch_dep.update(node.outvars)
            compute.append(node.index)
        elif uses_after:
            after.update(node.outvars)
            post.append(node.index)
        else:
            pre.append(node.index)
    return GradSplit(tuple(pre), tuple(compute), tuple(post), boundary)


def _batch_carries(graph: OpGraph, batch_inputs: set, per_micro_batch_nodes) -> set[int]:
    """Loop carry-enter nodes whose carry depends on the batch through the loop's back edge.

    The graph holds a loop body once, so a carry that starts batch-free (zeros) but is
    updated from the batch in the body (an RNN's cell state) looks batch-free where it enters;
    its stacked copies (the residuals the backward scan reads) would then pass as the same
    in every micro-batch. Found by iterating until no carry is added.
    """
    back_edges = [(enter, out) for loop in graph.loops if not loop.branches
                  for enter, out in zip(loop.carry_enter, loop.carry_out) if isinstance(out, int)]
    seeded: set[int] = set()
    while back_edges:
        dependent = set(batch_inputs)
        forced = set(per_micro_batch_nodes) | seeded
        for node in graph.nodes:
            if node.index in forced or any(isinstance(v, int) and v in dependent
                                           for v in node.invars):
                dependent.update(node.outvars)
        new = {enter for enter, out in back_edges if out in dependent and enter not in seeded}
        if not new:
            break
        seeded |= new
    return seeded
