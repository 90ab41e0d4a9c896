"""The pipelined executable: per-stage jitted programs on submeshes, driven by a schedule.

Input: a `PipelinePartition`, one sub-graph and `ShardingPlan` per stage, the stage meshes and
a `PipelineSchedule`. Output: `PipelineExecutable`, callable like the step function.

Per step the driver splits the batch into micro-batches, then walks the schedule's clocks:
each forward/backward task calls its stage's program on the micro-batch's values, moving
values between meshes with `jax.device_put` (asynchronous; there is no host sync inside a
step). Backward programs add the micro-batch's gradients to accumulators that live on the
stage's mesh; after the last micro-batch each mesh averages them, and the apply programs run
phase by phase (a scalar such as the global gradient norm crosses meshes between phases).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from alpa_lite.emit.accumulate import find_deferred_reductions
from alpa_lite.emit.shardings import (build_node_evaluator, finish_partial_sum,
                                      spec_to_partition_spec, value_specs)
from alpa_lite.markers import grad_boundary_p
from alpa_lite.emit.stages import PipelinePartition, Program
from alpa_lite.graph import OpGraph
from alpa_lite.inter_op.schedules import PipelineSchedule, TaskKind
from alpa_lite.plan import ShardingPlan
from alpa_lite.trace import TracedFunction, split_static_args


@dataclasses.dataclass
class _Compiled:
    program: Program
    fn: object
    in_shardings: tuple
    accumulated: tuple[int, ...]  # outputs added to accumulators (gradient sinks)
    passed: tuple[int, ...]       # other outputs


class PipelineExecutable:
    """Runs a pipelined plan.

    Attributes:
        meshes: the jax `Mesh` of each stage.
        schedule: the `PipelineSchedule` being run.
        programs: name -> jitted program (for inspection and timing).
    """

    def __init__(self, traced: TracedFunction, graph: OpGraph, partition: PipelinePartition,
                 subgraphs: Sequence[OpGraph], index_maps: Sequence[dict], plans: Sequence[ShardingPlan],
                 meshes: Sequence[Mesh], schedule: PipelineSchedule, num_micro_batches: int):
        self.traced, self.graph, self.partition = traced, graph, partition
        self.meshes, self.schedule, self.k = list(meshes), schedule, num_micro_batches
        self.plans = list(plans)
        self.planned = [value_specs(sub, plan) for sub, plan in zip(subgraphs, plans)]
        evaluators = [build_node_evaluator(sub, plan, mesh)
                      for sub, plan, mesh in zip(subgraphs, plans, meshes)]
        self.batch_inputs = {v for v, b in zip(graph.inputs, traced.batch_leaves) if b}
        sinks = partition.sinks
        self.partial_axes: list[dict[int, tuple[str, ...]]] = [{} for _ in meshes]
        self.compiled = {}
        for program in partition.forward + partition.backward + partition.apply:
            self.compiled[program.name] = self._compile(
                program, subgraphs[program.mesh], index_maps[program.mesh],
                evaluators[program.mesh], sinks)
        self._acc_ids = [[v for v, m in sinks.items() if m == s] for s in range(len(meshes))]
        self._zeros = [self._compile_zeros(s) for s in range(len(meshes))]
        self._means = [self._compile_means(s) for s in range(len(meshes))]
        self.programs = {name: c.fn for name, c in self.compiled.items()}

    # --- compilation ---------------------------------------------------------------------

    def sharding(self, mesh: int, value: int) -> NamedSharding:
        return NamedSharding(self.meshes[mesh], spec_to_partition_spec(self.planned[mesh][value]))

    def _compile(self, program: Program, sub: OpGraph, index_map: dict, eval_nodes,
                 sinks: dict) -> _Compiled:
        mesh = program.mesh
        nodes = [index_map[i] for i in program.nodes]
        accumulated = tuple(v for v in program.outputs if v in sinks)
        passed = tuple(v for v in program.outputs if v not in sinks)
        consts = dict(sub.consts)
        deferred = None
        if accumulated:  # gradients: reduce across devices once per step, not per micro-batch
            slice_index = next(n.index for n in sub.nodes if n.primitive is grad_boundary_p)
            deferred = find_deferred_reductions(sub, self.plans[mesh], nodes, slice_index)
            deferred.boundary_axes = {v: a for v, a in deferred.boundary_axes.items()
                                      if v in accumulated}
            self.partial_axes[mesh].update(deferred.boundary_axes)

        def run(*args):
            env = dict(zip(program.inputs, args[:len(program.inputs)]))
            env.update(consts)
            state = None if deferred is None else dataclasses.replace(deferred,
                                                                      partial_values=set())
            eval_nodes(env, nodes, state)
            accs = args[len(program.inputs):]
            return (tuple(env[v] for v in passed)
                    + tuple(a + env[v] for a, v in zip(accs, accumulated)))

        acc_shardings = tuple(self.acc_sharding(mesh, v) for v in accumulated)
        in_shardings = tuple(self.sharding(mesh, v) for v in program.inputs) + acc_shardings
        out_shardings = tuple(self.sharding(mesh, v) for v in passed) + acc_shardings
        donate = tuple(range(len(program.inputs), len(program.inputs) + len(accumulated)))
        fn = jax.jit(run, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate)
        return _Compiled(program, fn, in_shardings, accumulated, passed)

    def lower_program(self, name: str):
        """The jax `Lowered` of one program (``.compile().as_text()`` shows its collectives)."""
        compiled = self.compiled[name]
        mesh = compiled.program.mesh
        args = []
        for v, sharding in zip(compiled.program.inputs + compiled.accumulated,
                               compiled.in_shardings):
            aval = self.graph.avals[v]
            shape = tuple(aval.shape)
            if len(args) >= len(compiled.program.inputs) and v in self.partial_axes[mesh]:
                shape = (self.plans[mesh].mesh.axes_size(self.partial_axes[mesh][v]),) + shape
            args.append(jax.ShapeDtypeStruct(shape, aval.dtype, sharding=sharding))
        return compiled.fn.lower(*args)

    def acc_sharding(self, mesh: int, value: int) -> NamedSharding:
        """Accumulators of deferred reductions carry a leading dim of partial sums."""
        axes = self.partial_axes[mesh].get(value)
        spec = self.planned[mesh][value]
        if axes is None:
            return self.sharding(mesh, value)
        rest = tuple(tuple(a for a in dims if a not in axes) for dims in spec)
        return NamedSharding(self.meshes[mesh], spec_to_partition_spec((tuple(axes),) + rest))

    def _compile_zeros(self, mesh: int):
        ids = self._acc_ids[mesh]
        shapes = []
        for v in ids:
            aval = self.graph.avals[v]
            axes = self.partial_axes[mesh].get(v)
            lead = () if axes is None else (self.plans[mesh].mesh.axes_size(axes),)
            shapes.append((lead + tuple(aval.shape), aval.dtype))
        return jax.jit(lambda: tuple(jnp.zeros(shape, dtype) for shape, dtype in shapes),
                       out_shardings=tuple(self.acc_sharding(mesh, v) for v in ids))

    def _compile_means(self, mesh: int):
        ids = self._acc_ids[mesh]
        k, jax_mesh = self.k, self.meshes[mesh]
        axes = [self.partial_axes[mesh].get(v) for v in ids]
        specs = [self.planned[mesh][v] for v in ids]

        def means(*accs):
            out = []
            for acc, ax, spec in zip(accs, axes, specs):
                total = acc if ax is None else finish_partial_sum(acc, ax, spec, jax_mesh)
                out.append(total / k)
            return tuple(out)

        return jax.jit(means, in_shardings=tuple(self.acc_sharding(mesh, v) for v in ids),
                       out_shardings=tuple(self.sharding(mesh, v) for v in ids),
                       donate_argnums=tuple(range(len(ids))))

    # --- running -------------------------------------------------------------------------

    def flatten_args(self, args) -> list:
        dynamic, _, _ = split_static_args(args, tuple(self.traced.static_args))
        leaves, tree = jax.tree_util.tree_flatten(tuple(dynamic))
        if tree != self.traced.in_tree:
            raise ValueError(f"Arguments have structure {tree}, expected {self.traced.in_tree}.")
        return leaves

    def _place(self, value, sharding: NamedSharding):
        if getattr(value, "sharding", None) == sharding:
            return value
        return jax.device_put(value, sharding)

    def __call__(self, *args, _timings: dict | None = None):
        graph, k = self.graph, self.k
        store = dict(zip(graph.inputs, self.flatten_args(args)))
        # Host-side split: each micro-batch is then placed straight onto the stage that reads it.
        micro = {v: [host[i::k] for i in range(k)]
                 for v in self.batch_inputs for host in [np.asarray(store[v])]}
        per_mb: dict[tuple[int, int], object] = {}
        mb_keys: dict[int, list] = {mb: [] for mb in range(k)}
        latest: dict[int, object] = {}
        accs = [list(z()) if ids else [] for z, ids in zip(self._zeros, self._acc_ids)]
        acc_pos = [{v: i for i, v in enumerate(ids)} for ids in self._acc_ids]

        def fetch(v, mb, compiled: _Compiled, position: int):
            if v in micro:
                value = micro[v][mb]
            elif (v, mb) in per_mb:
                value = per_mb[(v, mb)]
            elif v in store:
                value = store[v]
            else:
                value = latest[v]
            return self._place(value, compiled.in_shardings[position])

        for task in self.schedule.dispatch_order():
            if task.kind is TaskKind.APPLY:
                continue
            program = (self.partition.forward if task.kind is TaskKind.FORWARD
                       else self.partition.backward)[task.stage]
            if not program.nodes:
                continue
            compiled = self.compiled[program.name]
            mb, mesh = task.micro_batch, program.mesh
            inputs = [fetch(v, mb, compiled, i) for i, v in enumerate(program.inputs)]
            acc_in = [accs[mesh][acc_pos[mesh][v]] for v in compiled.accumulated]
            start = time.perf_counter()
            outs = compiled.fn(*inputs, *acc_in)
            if _timings is not None:
                jax.block_until_ready(outs)
                _timings.setdefault(program.name, []).append(time.perf_counter() - start)
            for v, value in zip(compiled.passed, outs):
                per_mb[(v, mb)] = value
                mb_keys[mb].append((v, mb))
                latest[v] = value
            for v, value in zip(compiled.accumulated, outs[len(compiled.passed):]):
                accs[mesh][acc_pos[mesh][v]] = value
            if task.kind is TaskKind.BACKWARD and task.stage == 0:
                for key in mb_keys.pop(mb):  # micro-batch done: free its activations
                    per_mb.pop(key, None)
        boundary = self.partition.boundary
        sink_to_out = {s: d for s, d in zip(boundary.invars, boundary.outvars)
                       if isinstance(s, int)}
        for mesh, ids in enumerate(self._acc_ids):
            if ids:
                for v, mean in zip(ids, self._means[mesh](*accs[mesh])):
                    store[sink_to_out[v]] = mean
        for s, d in zip(boundary.invars, boundary.outvars):
            if not isinstance(s, int):
                store[d] = s.val
        for program in self.partition.apply:
            compiled = self.compiled[program.name]
            inputs = [fetch(v, -1, compiled, i) for i, v in enumerate(program.inputs)]
            for v, value in zip(compiled.passed, compiled.fn(*inputs)):
                store[v] = value
        outs = [store[v] if isinstance(v, int) and v in store else
                latest[v] if isinstance(v, int) else v.val for v in graph.outputs]
        return jax.tree_util.tree_unflatten(self.traced.out_tree, outs)

    def time_programs(self, *args, repeats: int = 3) -> dict[str, float]:
        """Median seconds of each forward/backward program over ``repeats`` steps.

        Blocks after every program call (only here: normal steps never block).
        """
        self(*args)  # compile and warm up
        samples: dict[str, list[float]] = {}
        for _ in range(repeats):
            timings: dict[str, list[float]] = {}
            self(*args, _timings=timings)
            for name, values in timings.items():
                samples.setdefault(name, []).append(float(np.median(values)))
        return {name: float(np.median(values)) for name, values in samples.items()}
