"""ShardExecutable: the jitted SPMD program of a ShardParallel-family plan, callable like the
original step function.

The program is one `jax.jit` over the step's own (pytree) arguments, with the plan's
`NamedSharding`s as its in/out shardings. A call therefore goes through jax's C++ dispatch
path: no per-leaf Python work, arguments moved only when their placement differs from the
plan's (jax transfers host arrays and uncommitted arrays itself). The Python wrapper below
runs only when jax traces, i.e. when it sees a new argument signature; it then checks that
the arguments are the ones the plan was made for and raises `PlanMismatch` otherwise, so a
stale plan is never run on other shapes.
"""

from __future__ import annotations

from typing import Sequence

import jax

from alpa_lite.emit.accumulate import emit_accumulating_function
from alpa_lite.pipeline_model.grad_split import split_at_grad_boundary
from alpa_lite.emit.shardings import build_node_evaluator, emit_flat_function
from alpa_lite.emit.specs import build_jax_mesh, named_shardings
from alpa_lite.emit.transfer import multi_process, place
from alpa_lite.graph import OpGraph
from alpa_lite.micro_batching import MicroBatchPlan
from alpa_lite.plan import ParallelPlan
from alpa_lite.trace import TracedFunction, abstract_signature, split_static_args


class PlanMismatch(Exception):
    """The arguments of a call are not those the executable was planned for (internal)."""


class ShardExecutable:
    """Runs a plan through one jitted program.

    Attributes:
        plan: the `ParallelPlan` it runs.
        jax_mesh: the device mesh.
        in_shardings / out_shardings: the `NamedSharding` of each flat input / output.
        input_shardings: the in shardings as a pytree matching the dynamic arguments.
    """

    def __init__(self, traced: TracedFunction, graph: OpGraph, plan: ParallelPlan,
                 devices: Sequence, *, signature: tuple, donate_argnums: Sequence[int] = (),
                 micro: MicroBatchPlan | None = None):
        self.traced, self.graph, self.plan = traced, graph, plan
        self.signature = signature
        sharding = plan.sharding
        self.jax_mesh = build_jax_mesh(sharding.mesh, devices)
        self.in_shardings = named_shardings(sharding.input_specs, self.jax_mesh)
        self.out_shardings = named_shardings(sharding.output_specs, self.jax_mesh)
        self.input_shardings = jax.tree_util.tree_unflatten(traced.in_tree, self.in_shardings)
        flat_fn = self._emit(micro)
        static_argnums = tuple(sorted(traced.static_args))
        out_tree = traced.out_tree

        def step(*args):
            # Runs only while jax traces (a new argument signature), never per call.
            if abstract_signature(args, static_argnums) != signature:
                raise PlanMismatch
            dynamic, _, _ = split_static_args(args, static_argnums)
            leaves = jax.tree_util.tree_leaves(tuple(dynamic))
            return jax.tree_util.tree_unflatten(out_tree, flat_fn(*leaves))

        self._jitted = jax.jit(
            step, static_argnums=static_argnums, donate_argnums=tuple(donate_argnums),
            in_shardings=self.input_shardings,
            out_shardings=jax.tree_util.tree_unflatten(out_tree, self.out_shardings))

    def _emit(self, micro: MicroBatchPlan | None):
        graph, sharding = self.graph, self.plan.sharding
        if self.plan.num_micro_batches == 1:
            return emit_flat_function(graph, sharding, self.jax_mesh)
        batch_inputs = [v for v, b in zip(graph.inputs, self.traced.batch_leaves) if b]
        split = split_at_grad_boundary(graph, batch_inputs, micro.random_dims)
        eval_nodes = build_node_evaluator(graph, sharding, self.jax_mesh)
        return emit_accumulating_function(graph, sharding, split, batch_inputs,
                                          self.plan.num_micro_batches, eval_nodes,
                                          self.jax_mesh, micro)

    def call_unplaced(self, *args):
        """The fast path: calls the program as is.

        jax itself transfers host and uncommitted arrays; an argument committed elsewhere
        makes it raise, and then the arguments are placed and the call repeated.

        Raises:
            PlanMismatch: the arguments are not those the plan was made for.
        """
        try:
            return self._jitted(*args)
        except (ValueError, TypeError):
            static_argnums = tuple(sorted(self.traced.static_args))
            if abstract_signature(args, static_argnums) != self.signature:
                raise PlanMismatch from None  # e.g. another pytree structure
            return self(*args)

    def place(self, args) -> tuple:
        """The arguments with every dynamic leaf moved to the plan's sharding (if not there).

        In one process, host values (numpy arrays, Python scalars) of the batch stay on the
        host: a training loop passes a fresh host batch every step, and jax keys its cache on
        whether an argument was placed, so placing it on the first call would compile the
        program a second time on the next one. jax transfers them itself.
        """
        static_argnums = tuple(sorted(self.traced.static_args))
        dynamic, static, dyn_idx = split_static_args(args, static_argnums)
        leaves, tree = jax.tree_util.tree_flatten(tuple(dynamic))
        moved = [i for i, (leaf, batch) in enumerate(zip(leaves, self.traced.batch_leaves))
                 if multi_process() or not batch or isinstance(leaf, jax.Array)]
        placed_leaves = list(leaves)
        for i, value in zip(moved, place([leaves[i] for i in moved],
                                         [self.in_shardings[i] for i in moved])):
            placed_leaves[i] = value
        placed = jax.tree_util.tree_unflatten(tree, placed_leaves)
        result = list(args)
        for i, value in zip(dyn_idx, placed):
            result[i] = value
        return tuple(result)

    def __call__(self, *args):
        return self._jitted(*self.place(args))

    def lower(self, *args):
        """The jax `Lowered` program (``.compile().as_text()`` shows the collectives).

        Arguments may be arrays or `jax.ShapeDtypeStruct`s.
        """
        return self._jitted.lower(*args)
