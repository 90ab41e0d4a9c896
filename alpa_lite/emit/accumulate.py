"""Gradient accumulation: run the part of a train step before `alpa_lite.grad`'s boundary once
per micro-batch, average what crosses the boundary, then run the rest once.

Input: `OpGraph` split by `split_at_grad_boundary` + a per-node emitter. Output: a function of
the flat inputs (full batch) that loops over micro-batches with `jax.lax.scan`.

Micro-batch ``i`` takes examples ``i, i+k, i+2k, ...`` of the batch: with the batch split over
devices along dim 0 this split needs no data movement (a contiguous split would).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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


def split_at_grad_boundary(graph: OpGraph, batch_inputs: list[int]) -> GradSplit:
    """Splits ``graph`` around its single `grad_boundary` node.

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
    pre, compute, post = [], [], []
    for node in graph.nodes:
        ins = {v for v in node.invars if isinstance(v, int)}
        uses_batch, uses_after = bool(ins & batch_dep), bool(ins & after)
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


def split_micro_batches(x, num_micro_batches: int):
    """[B, ...] -> [k, B/k, ...] with micro-batch i = examples i, i+k, ... (no data movement)."""
    per = x.shape[0] // num_micro_batches
    y = x.reshape((per, num_micro_batches) + x.shape[1:])
    return jnp.moveaxis(y, 1, 0)


def emit_accumulating_function(graph: OpGraph, split: GradSplit, batch_inputs: list[int],
                               num_micro_batches: int, eval_nodes):
    """The step function with gradient accumulation.

    Args:
        graph: the graph traced at micro-batch size.
        split: from `split_at_grad_boundary`.
        batch_inputs: value ids of the batch inputs.
        num_micro_batches: k.
        eval_nodes: ``eval_nodes(env, node_indices)`` evaluates the nodes into ``env``.
    """
    boundary = graph.nodes[split.boundary]
    body_nodes = tuple(i for i in split.compute if i != split.boundary)
    acc_ids = [v for v in boundary.invars if isinstance(v, int)]
    for v in acc_ids:
        if not jnp.issubdtype(graph.avals[v].dtype, jnp.floating):
            raise InvalidConfigError(
                f"alpa_lite.value_and_grad returns a {graph.avals[v].dtype} value; only floating "
                "values can be averaged over micro-batches. Return it as a float, or drop "
                "num_micro_batches.")

    def run(*flat_args):
        env = dict(zip(graph.inputs, flat_args))
        env.update(graph.consts)
        eval_nodes(env, split.pre)
        micro = {v: split_micro_batches(env[v], num_micro_batches) for v in batch_inputs}

        def body(acc, xs):
            local = dict(env)
            local.update(xs)
            eval_nodes(local, body_nodes)
            return [a + local[v] for a, v in zip(acc, acc_ids)], None

        init = [jnp.zeros(graph.avals[v].shape, graph.avals[v].dtype) for v in acc_ids]
        acc, _ = jax.lax.scan(body, init, micro)
        means = dict(zip(acc_ids, [a / num_micro_batches for a in acc]))
        for src, dst in zip(boundary.invars, boundary.outvars):
            env[dst] = means[src] if isinstance(src, int) else src.val
        eval_nodes(env, split.post)
        return tuple(env[v] if isinstance(v, int) else v.val for v in graph.outputs)

    return run
