"""ShardExecutable: the jitted SPMD program of a ShardParallel-family plan, callable like the
original step function."""

from __future__ import annotations

from typing import Sequence

import jax

from alpa_lite.emit.accumulate import emit_accumulating_function, split_at_grad_boundary
from alpa_lite.emit.shardings import (build_jax_mesh, build_node_evaluator, emit_flat_function,
                                      named_shardings)
from alpa_lite.graph import OpGraph
from alpa_lite.plan import ParallelPlan
from alpa_lite.trace import TracedFunction, split_static_args


class ShardExecutable:
    """Runs a plan: flattens the arguments, places them, calls the jitted program.

    Attributes:
        plan: the `ParallelPlan` it runs.
        jax_mesh: the device mesh.
        in_shardings / out_shardings: the `NamedSharding` of each flat input / output.
    """

    def __init__(self, traced: TracedFunction, graph: OpGraph, plan: ParallelPlan,
                 devices: Sequence, *, donate_argnums: Sequence[int] = ()):
        self.traced, self.graph, self.plan = traced, graph, plan
        sharding = plan.sharding
        self.jax_mesh = build_jax_mesh(sharding.mesh, devices)
        self.in_shardings = named_shardings(sharding.input_specs, self.jax_mesh)
        self.out_shardings = named_shardings(sharding.output_specs, self.jax_mesh)
        donate = set(donate_argnums)
        flat_donate = tuple(i for i, a in enumerate(traced.in_argnums) if a in donate)
        k = plan.num_micro_batches
        if k == 1:
            fn = emit_flat_function(graph, sharding, self.jax_mesh)
        else:
            batch_inputs = [v for v, b in zip(graph.inputs, traced.batch_leaves) if b]
            split = split_at_grad_boundary(graph, batch_inputs)
            eval_nodes = build_node_evaluator(graph, sharding, self.jax_mesh)
            fn = emit_accumulating_function(graph, sharding, split, batch_inputs, k, eval_nodes,
                                            self.jax_mesh)
        self._jitted = jax.jit(fn, in_shardings=self.in_shardings,
                               out_shardings=self.out_shardings, donate_argnums=flat_donate)

    def flatten_args(self, args) -> list:
        dynamic, _, _ = split_static_args(args, tuple(self.traced.static_args))
        leaves, tree = jax.tree_util.tree_flatten(tuple(dynamic))
        if tree != self.traced.in_tree:
            raise ValueError(f"Arguments have structure {tree}, expected {self.traced.in_tree}.")
        return [jax.device_put(x, s) for x, s in zip(leaves, self.in_shardings)]

    def __call__(self, *args):
        outs = self._jitted(*self.flatten_args(args))
        return jax.tree_util.tree_unflatten(self.traced.out_tree, outs)

    def lower(self, *args):
        """The jax `Lowered` program (``.compile().as_text()`` shows the collectives)."""
        leaves = self.flatten_args(args)
        return self._jitted.lower(*leaves)
