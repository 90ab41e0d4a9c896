"""Gradient accumulation: run the part of a train step before `alpa_lite.grad`'s boundary once
per micro-batch, combine what crosses the boundary (`alpa_lite.micro_batching` says how), then
run the rest once.

Input: `OpGraph` split by `split_at_grad_boundary` + a per-node emitter. Output: a function of
the flat inputs (full batch) that loops over micro-batches with `jax.lax.scan`.

Micro-batch ``i`` takes examples ``i, i+k, i+2k, ...`` of the batch: with the batch split over
devices along dim 0 this split needs no data movement (a contiguous split would).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp

from alpa_lite.emit.random_bits import (distinct_micro_batch_bits, is_sliceable,
                                        micro_batch_random_bits)
from alpa_lite.emit.deferred import find_deferred_reductions, finish_partial_sum
from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import OpGraph
from alpa_lite.micro_batching import Combine, MicroBatchPlan
from alpa_lite.pipeline_model.grad_split import GradSplit
from alpa_lite.plan import ShardingPlan, value_specs


def split_micro_batches(x, num_micro_batches: int):
    """[B, ...] -> [k, B/k, ...] with micro-batch i = examples i, i+k, ... (no data movement)."""
    per = x.shape[0] // num_micro_batches
    y = x.reshape((per, num_micro_batches) + x.shape[1:])
    return jnp.moveaxis(y, 1, 0)


def emit_accumulating_function(graph: OpGraph, plan: ShardingPlan, split: GradSplit,
                               batch_inputs: list[int], num_micro_batches: int, eval_nodes,
                               jax_mesh, micro: MicroBatchPlan):
    """The step function with gradient accumulation and once-per-step gradient reduction.

    Each value crossing the gradient boundary is combined over micro-batches by its rule in
    ``micro`` (sum, mean, max, min, per-example concatenation, or computed once when it does
    not depend on the batch), so the result equals the full-batch step's.

    Args:
        graph: the graph traced at micro-batch size.
        plan: its sharding plan.
        split: from `split_at_grad_boundary`.
        batch_inputs: value ids of the batch inputs.
        num_micro_batches: k.
        eval_nodes: from `build_node_evaluator`.
        jax_mesh: the device mesh.
        micro: from `alpa_lite.micro_batching.build_micro_batch_plan`.
    """
    k = num_micro_batches
    boundary = graph.nodes[split.boundary]
    body_nodes = tuple(i for i in split.compute if i != split.boundary)
    ids = list(dict.fromkeys(v for v in boundary.invars if isinstance(v, int)))
    rules = {v: micro.rules[v] for v in ids}
    check_combinable(graph, rules)
    acc_ids = [v for v in ids if rules[v].combine not in (Combine.SAME, Combine.CONCAT)]
    concat_ids = [v for v in ids if rules[v].combine is Combine.CONCAT]
    summed = {v for v in ids if rules[v].combine in (Combine.SUM, Combine.MEAN)}
    deferred = find_deferred_reductions(graph, plan, split.compute, split.boundary, summed)
    planned = value_specs(graph, plan)
    random_dims = micro.random_dims

    def initial(v):
        axes = deferred.boundary_axes.get(v)
        lead = () if axes is None else (plan.mesh.axes_size(axes),)
        return combine_identity(rules[v].combine, lead + tuple(graph.avals[v].shape),
                                graph.avals[v].dtype)

    def run(*flat_args):
        env = dict(zip(graph.inputs, flat_args))
        env.update(graph.consts)
        eval_nodes(env, split.pre)
        micro_inputs = {v: split_micro_batches(env[v], k) for v in batch_inputs}

        def body(acc, xs):
            inputs, index = xs
            local = dict(env)
            local.update(inputs)
            overrides = {i: random_slice_override(graph.nodes[i], d, k, index)
                         for i, d in random_dims.items()}
            eval_nodes(local, body_nodes, dataclasses.replace(deferred, partial_values=set()),
                       overrides)
            new = [combine_pair(rules[v].combine, a, local[v]) for a, v in zip(acc, acc_ids)]
            return new, [local[v] for v in concat_ids]

        acc, stacked = jax.lax.scan(body, [initial(v) for v in acc_ids],
                                    (micro_inputs, jnp.arange(k, dtype=jnp.int32)))
        combined = {v: env[v] for v in ids if rules[v].combine is Combine.SAME}
        for v, total in zip(acc_ids, acc):
            if v in deferred.boundary_axes:
                total = finish_partial_sum(total, deferred.boundary_axes[v], planned[v], jax_mesh)
            combined[v] = total / k if rules[v].combine is Combine.MEAN else total
        for v, values in zip(concat_ids, stacked):
            combined[v] = interleave_micro_batches(values, rules[v].dim, rules[v].group)
        for src, dst in zip(boundary.invars, boundary.outvars):
            env[dst] = combined[src] if isinstance(src, int) else src.val
        eval_nodes(env, split.post)
        return tuple(env[v] if isinstance(v, int) else v.val for v in graph.outputs)

    return run


def check_combinable(graph: OpGraph, rules: dict) -> None:
    """Integer means cannot be formed exactly (the division would round)."""
    for v, rule in rules.items():
        if rule.combine is Combine.MEAN and not jnp.issubdtype(graph.avals[v].dtype, jnp.inexact):
            raise InvalidConfigError(
                f"alpa_lite.value_and_grad returns an integer ({graph.avals[v].dtype}) mean over "
                "the batch; it cannot be rebuilt exactly from micro-batch means. Return the "
                "integer sum (and divide after the step), or set num_micro_batches=None.")


def combine_identity(combine: Combine, shape: tuple, dtype):
    """The accumulator's start: 0 for sums and means, the lowest value for a maximum, ..."""
    if combine in (Combine.MAX, Combine.MIN):
        if jnp.issubdtype(dtype, jnp.bool_):
            fill = combine is Combine.MIN
        elif jnp.issubdtype(dtype, jnp.inexact):
            fill = -jnp.inf if combine is Combine.MAX else jnp.inf
        else:
            info = jnp.iinfo(dtype)
            fill = info.min if combine is Combine.MAX else info.max
        return jnp.full(shape, fill, dtype)
    return jnp.zeros(shape, dtype)


def combine_pair(combine: Combine, acc, value):
    """One accumulation step of ``combine`` (SUM and MEAN add; MEAN divides at the end)."""
    if combine is Combine.MAX:
        return jnp.maximum(acc, value)
    if combine is Combine.MIN:
        return jnp.minimum(acc, value)
    return acc + value


def interleave_micro_batches(stacked, dim: int, group: int):
    """[k, ..., b*group, ...] micro-batch values -> [..., k*b*group, ...] in batch order.

    Micro-batch i holds examples i, i+k, ...: example j*k + i is row j of micro-batch i.
    """
    k = stacked.shape[0]
    values = jnp.moveaxis(stacked, 0, dim)  # [..., k, b*group, ...]
    shape = values.shape
    rows = shape[dim + 1] // group
    values = values.reshape(shape[:dim] + (k, rows, group) + shape[dim + 2:])
    values = jnp.swapaxes(values, dim, dim + 1)  # [..., b, k, group, ...]
    return values.reshape(shape[:dim] + (k * rows * group,) + shape[dim + 2:])


def random_slice_override(node, dim: int, num_micro_batches: int, index):
    """A ``random_bits`` node drawing micro-batch ``index``'s rows of the full-batch draw.

    Where the PRNG has no per-element formula (see `alpa_lite.emit.random_bits`), each
    micro-batch draws from its own stream instead, with a warning: never one mask for all.
    """
    bit_width, shape = node.params["bit_width"], tuple(node.params["shape"])

    def draw(key):
        if is_sliceable(key, micro_shape=shape, num_micro_batches=num_micro_batches):
            return [micro_batch_random_bits(
                key, bit_width=bit_width, micro_shape=shape, dim=dim,
                num_micro_batches=num_micro_batches, micro_batch_index=index)]
        warnings.warn(
            f"A random draw of shape {shape} (per micro-batch) cannot reproduce the serial "
            "full-batch stream with this PRNG (only partitionable threefry can); each "
            "micro-batch draws from its own stream, so results differ from serial jax.jit in "
            "their random samples. Use jax.random.key(..., impl='threefry2x32') with "
            "jax_threefry_partitionable=True for exact results.", stacklevel=2)
        return [distinct_micro_batch_bits(key, bit_width=bit_width, micro_shape=shape,
                                          micro_batch_index=index)]

    return draw
