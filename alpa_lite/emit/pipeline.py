"""The pipelined executable: per-stage jitted programs on submeshes, driven by a schedule.

Input: a `PipelinePartition`, one sub-graph and `ShardingPlan` per stage, the stage meshes, a
`PipelineSchedule` and the `MicroBatchPlan`. Output: `PipelineExecutable`, callable like the
step function.

The schedule is compiled once into a flat list of instructions over numbered registers
(``_Instruction``: a callable, the registers it reads, the registers it writes, the registers
that die after it). A step places the arguments, then runs the list: split the batch into
micro-batches on each mesh that reads it, run forward/backward programs, move values between
meshes with one batched `jax.device_put` per program (only where the producer's sharding
differs from the consumer's), combine what crosses the gradient boundary (sum, mean, max,
min, per-example concatenation), and run the apply programs phase by phase. Dispatch is
asynchronous: nothing blocks inside a step. A value the schedule would read before any
program made it is an internal error found while building the list, never a substitute.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alpa_lite.emit.accumulate import (combine_identity, combine_pair, interleave_micro_batches,
                                       random_slice_override)
from alpa_lite.emit.deferred import find_deferred_reductions, finish_partial_sum
from alpa_lite.emit.executable import PlanMismatch
from alpa_lite.emit.shardings import build_node_evaluator
from alpa_lite.emit.specs import spec_to_partition_spec
from alpa_lite.pipeline_model.partition import PipelinePartition, Program
from alpa_lite.emit.transfer import CrossMeshMove, ReplicateEverywhere, multi_process, place
from alpa_lite.graph import OpGraph
from alpa_lite.pipeline_model.schedules import PipelineSchedule, TaskKind
from alpa_lite.markers import grad_boundary_p, layer_boundary_p
from alpa_lite.micro_batching import Combine, MicroBatchPlan, Rule
from alpa_lite.plan import ShardingPlan, value_specs
from alpa_lite.trace import TracedFunction, leaf_signature, split_static_args

_ACCUMULATED = (Combine.SUM, Combine.MEAN, Combine.MAX, Combine.MIN)
# Non-state outputs up to this size are replicated on every device of a multi-process job.
_REPLICATED_OUTPUT_BYTES = 64 * 2**20


@dataclasses.dataclass
class _Compiled:
    program: Program
    fn: object
    in_shardings: tuple
    accumulated: tuple[int, ...]  # outputs combined into accumulators (gradient sinks)
    passed: tuple[int, ...]       # other outputs
    takes_index: bool             # reads the micro-batch index (random draws)
    body: Callable = None         # the traced function ``fn`` jits
    jit_options: dict = dataclasses.field(default_factory=dict)  # and how


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    fn: Callable
    reads: tuple[int, ...]
    writes: tuple[int, ...]
    frees: tuple[int, ...] = ()
    blocks: bool = False  # wait for the results (programs spanning processes)


class PipelineExecutable:
    """Runs a pipelined plan.

    Attributes:
        meshes: the jax `Mesh` of each stage.
        schedule: the `PipelineSchedule` being run.
        programs: name -> jitted program (for inspection and timing).
        instructions: the compiled step (see the module docstring).
        input_shardings: where the step wants each dynamic argument leaf (a pytree matching
            the dynamic arguments): on the submesh of the first program reading it.
    """

    def __init__(self, traced: TracedFunction, graph: OpGraph, partition: PipelinePartition,
                 subgraphs: Sequence[OpGraph], index_maps: Sequence[dict],
                 plans: Sequence[ShardingPlan], meshes: Sequence[Mesh],
                 schedule: PipelineSchedule, num_micro_batches: int,
                 micro: MicroBatchPlan | None = None, signature: tuple | None = None,
                 donated: frozenset[int] = frozenset(),
                 state_outputs: frozenset[int] = frozenset()):
        self.traced, self.graph, self.partition = traced, graph, partition
        self.donated = donated  # flat input positions whose buffers the step may reuse
        self.meshes, self.schedule, self.k = list(meshes), schedule, num_micro_batches
        self.plans, self.signature = list(plans), signature
        self.planned = [value_specs(sub, plan) for sub, plan in zip(subgraphs, plans)]
        sinks = partition.sinks
        self.rules = {v: (micro.rules[v] if micro is not None else Rule(Combine.SUM))
                      for v in sinks}
        self.random_dims = micro.random_dims if micro is not None else {}
        evaluators = [build_node_evaluator(sub, plan, mesh)
                      for sub, plan, mesh in zip(subgraphs, plans, meshes)]
        self.batch_inputs = {v for v, b in zip(graph.inputs, traced.batch_leaves) if b}
        self.partial_axes: list[dict[int, tuple[str, ...]]] = [{} for _ in meshes]
        self.compiled = {}
        for program in partition.compute_programs() + partition.apply:
            self.compiled[program.name] = self._compile(
                program, subgraphs[program.mesh], index_maps[program.mesh],
                evaluators[program.mesh])
        self._acc_ids = [[v for v, m in sinks.items()
                          if m == s and self.rules[v].combine in _ACCUMULATED]
                         for s in range(len(meshes))]
        self.programs = {name: c.fn for name, c in self.compiled.items()}
        builder = _ScheduleBuilder(self)
        self.instructions, self._inputs, self._initial, self._outputs = builder.build()
        self.input_shardings = self._first_read_shardings()
        self._replicators = self._output_replicators(builder.sharding_of, state_outputs)

    def _output_replicators(self, sharding_of: dict, state_outputs) -> list:
        """(output position, `ReplicateEverywhere`) for each small output that is not state
        (the loss, aux values) and lives on devices of only some processes; the state keeps
        its placement on the stage meshes."""
        if not multi_process():
            return []
        result = []
        avals = self.traced.closed_jaxpr.out_avals
        for position, (slot, _) in enumerate(self._outputs):
            sharding = sharding_of.get(slot) if slot is not None else None
            aval = avals[position]
            if sharding is None or position in state_outputs or \
                    jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key) or \
                    aval.size * aval.dtype.itemsize > _REPLICATED_OUTPUT_BYTES or \
                    len(sharding.mesh.devices.flat) == jax.device_count():
                continue
            result.append((position, ReplicateEverywhere(sharding, aval)))
        return result

    def _first_read_shardings(self):
        first: dict[int, NamedSharding] = {}
        for position, _, sharding in self._inputs:
            if sharding is not None:
                first.setdefault(position, sharding)
        unread = self.replicated(0)  # a leaf no program reads: anywhere will do
        flat = [first.get(i, unread) for i in range(len(self.graph.inputs))]
        return jax.tree_util.tree_unflatten(self.traced.in_tree, flat)

    # --- compilation ---------------------------------------------------------------------

    def sharding(self, mesh: int, value: int) -> NamedSharding:
        return NamedSharding(self.meshes[mesh], spec_to_partition_spec(self.planned[mesh][value]))

    def _compile(self, program: Program, sub: OpGraph, index_map: dict,
                 eval_nodes) -> _Compiled:
        mesh = program.mesh
        nodes = [index_map[i] for i in program.nodes]
        sinks = self.partition.sinks
        accumulated = tuple(v for v in program.outputs
                            if v in sinks and self.rules[v].combine in _ACCUMULATED)
        passed = tuple(v for v in program.outputs if v not in accumulated)
        combines = [self.rules[v].combine for v in accumulated]
        random_nodes = {index_map[i]: d for i, d in self.random_dims.items() if i in index_map
                        and i in program.nodes}
        consts = dict(sub.consts)
        deferred = None
        if accumulated:  # gradients: reduce across devices once per step, not per micro-batch
            slice_index = next(n.index for n in sub.nodes if n.primitive is grad_boundary_p)
            summed = {v for v in accumulated if self.rules[v].combine in (Combine.SUM,
                                                                          Combine.MEAN)}
            deferred = find_deferred_reductions(sub, self.plans[mesh], nodes, slice_index,
                                                summed)
            deferred.boundary_axes = {v: a for v, a in deferred.boundary_axes.items()
                                      if v in accumulated}
            self.partial_axes[mesh].update(deferred.boundary_axes)
        num_inputs, k = len(program.inputs), self.k

        def run(*args):
            env = dict(zip(program.inputs, args[:num_inputs]))
            env.update(consts)
            rest = args[num_inputs:]
            overrides = None
            if random_nodes:
                index, rest = rest[0], rest[1:]
                overrides = {i: random_slice_override(sub.nodes[i], d, k, index)
                             for i, d in random_nodes.items()}
            state = None if deferred is None else dataclasses.replace(deferred,
                                                                      partial_values=set())
            eval_nodes(env, nodes, state, overrides)
            return (tuple(env[v] for v in passed)
                    + tuple(combine_pair(c, a, env[v])
                            for c, a, v in zip(combines, rest, accumulated)))

        acc_shardings = tuple(self.acc_sharding(mesh, v) for v in accumulated)
        index_sharding = (self.replicated(mesh),) if random_nodes else ()
        in_shardings = (tuple(self.sharding(mesh, v) for v in program.inputs) + index_sharding
                        + acc_shardings)
        out_shardings = tuple(self.sharding(mesh, v) for v in passed) + acc_shardings
        first_acc = num_inputs + len(index_sharding)
        donate = tuple(range(first_acc, first_acc + len(accumulated)))
        options = dict(in_shardings=in_shardings, out_shardings=out_shardings,
                       donate_argnums=donate)
        return _Compiled(program, jax.jit(run, **options), in_shardings, accumulated, passed,
                         bool(random_nodes), run, options)

    def replicated(self, mesh: int) -> NamedSharding:
        return NamedSharding(self.meshes[mesh], PartitionSpec())

    def lower_program(self, name: str):
        """The jax `Lowered` of one program (``.compile().as_text()`` shows its collectives)."""
        compiled = self.compiled[name]
        mesh = compiled.program.mesh
        values = list(compiled.program.inputs) + (["index"] if compiled.takes_index else []) \
            + list(compiled.accumulated)
        args = []
        for position, (v, sharding) in enumerate(zip(values, compiled.in_shardings)):
            if v == "index":
                args.append(jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding))
                continue
            aval = self.graph.avals[v]
            shape = tuple(aval.shape)
            if position >= len(compiled.program.inputs) and v in self.partial_axes[mesh]:
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

    def compile_zeros(self, mesh: int):
        """A program making the mesh's accumulators (0, or the lowest value for a maximum)."""
        ids = self._acc_ids[mesh]
        specs = []
        for v in ids:
            aval = self.graph.avals[v]
            axes = self.partial_axes[mesh].get(v)
            lead = () if axes is None else (self.plans[mesh].mesh.axes_size(axes),)
            specs.append((self.rules[v].combine, lead + tuple(aval.shape), aval.dtype))
        return jax.jit(lambda: tuple(combine_identity(*spec) for spec in specs),
                       out_shardings=tuple(self.acc_sharding(mesh, v) for v in ids))

    def compile_finish(self, mesh: int):
        """A program turning the mesh's accumulators into the boundary's values."""
        ids = self._acc_ids[mesh]
        k, jax_mesh = self.k, self.meshes[mesh]
        axes = [self.partial_axes[mesh].get(v) for v in ids]
        specs = [self.planned[mesh][v] for v in ids]
        means = [self.rules[v].combine is Combine.MEAN for v in ids]

        def finish(*accs):
            out = []
            for acc, ax, spec, mean in zip(accs, axes, specs, means):
                total = acc if ax is None else finish_partial_sum(acc, ax, spec, jax_mesh)
                out.append(total / k if mean else total)
            return tuple(out)

        return jax.jit(finish, in_shardings=tuple(self.acc_sharding(mesh, v) for v in ids),
                       out_shardings=tuple(self.sharding(mesh, v) for v in ids),
                       donate_argnums=tuple(range(len(ids))))

    def compile_concat(self, mesh: int, value: int):
        """A program putting a per-example value's k micro-batch parts back in batch order."""
        rule, sharding = self.rules[value], self.sharding(mesh, value)
        return jax.jit(lambda *parts: (interleave_micro_batches(jnp.stack(parts), rule.dim,
                                                                rule.group),),
                       out_shardings=(sharding,))

    def compile_split(self, shardings: Sequence[NamedSharding]):
        """A program splitting full batch leaves into k strided micro-batches each."""
        k = self.k
        return jax.jit(lambda *leaves: tuple(x[i::k] for x in leaves for i in range(k)),
                       in_shardings=tuple(shardings),
                       out_shardings=tuple(s for s in shardings for _ in range(k)))

    # --- running -------------------------------------------------------------------------

    def call_unplaced(self, *args):
        """Runs the step if the arguments match the plan; else raises `PlanMismatch`."""
        dynamic, static, _ = split_static_args(args, tuple(sorted(self.traced.static_args)))
        leaves, tree = jax.tree_util.tree_flatten(tuple(dynamic))
        if self.signature is not None and (
                tree != self.signature[0] or static != self.traced.static_args
                or leaf_signature(leaves) != self.signature[1]):
            raise PlanMismatch
        return self.run(leaves)

    def __call__(self, *args, _timings: dict | None = None):
        dynamic, _, _ = split_static_args(args, tuple(self.traced.static_args))
        leaves, tree = jax.tree_util.tree_flatten(tuple(dynamic))
        if tree != self.traced.in_tree:
            raise ValueError(f"Arguments have structure {tree}, expected {self.traced.in_tree}.")
        return self.run(leaves, _timings)

    def run(self, leaves: list, _timings: dict | None = None):
        """One step on the flat dynamic arguments (see the module docstring)."""
        regs = list(self._initial)
        misplaced, targets, slots = [], [], []
        for position, slot, sharding in self._inputs:
            value = leaves[position]
            if sharding is None or getattr(value, "sharding", None) == sharding:
                regs[slot] = value
            else:
                misplaced.append(value)
                targets.append(sharding)
                slots.append(slot)
        if misplaced:
            for slot, value in zip(slots, place(misplaced, targets)):
                regs[slot] = value
        for instruction in self.instructions:
            start = time.perf_counter()
            results = instruction.fn(*[regs[i] for i in instruction.reads])
            if _timings is not None and instruction.name in self.programs:
                jax.block_until_ready(results)
                _timings.setdefault(instruction.name, []).append(time.perf_counter() - start)
            if instruction.blocks:
                jax.block_until_ready(results)
            for slot, value in zip(instruction.writes, results):
                regs[slot] = value
            for slot in instruction.frees:
                regs[slot] = None
        outs = [regs[slot] if slot is not None else literal for slot, literal in self._outputs]
        for position, replicate in self._replicators:
            outs[position] = replicate(outs[position])
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
        return {name: float(np.median(values)) for name, values in samples.items()
                if not name.startswith("apply")}


class _ScheduleBuilder:
    """Compiles one step of the schedule into `_Instruction`s over numbered registers."""

    def __init__(self, executable: PipelineExecutable):
        self.ex = executable
        self.slots: dict[tuple, int] = {}
        self.sharding_of: dict[int, NamedSharding] = {}
        self.instructions: list[_Instruction] = []
        self.inputs: list[tuple[int, int, NamedSharding]] = []
        self.initial: dict[int, object] = {}

    def slot(self, key: tuple, sharding: NamedSharding | None = None) -> int:
        if key not in self.slots:
            self.slots[key] = len(self.slots)
        slot = self.slots[key]
        if sharding is not None:
            self.sharding_of[slot] = sharding
        return slot

    def batch_independent_values(self) -> set[int]:
        """Values that are the same in every micro-batch: outputs of the operators before the
        boundary that read no batch value, and a layer marker's copy of such a value (the
        parameters a layer reads). Every micro-batch reads micro-batch 0's copy, so a
        stage holds one copy of its parameters, not one per micro-batch in flight."""
        ex = self.ex
        split = ex.partition.split
        free = {v for i in split.pre for v in ex.graph.nodes[i].outvars}
        known = free | {v for v in ex.graph.inputs if v not in ex.batch_inputs} | {
            v for v, _ in ex.graph.consts}
        for index in split.compute:
            node = ex.graph.nodes[index]
            if node.primitive is layer_boundary_p:
                fresh = {out for a, out in zip(node.invars, node.outvars)
                         if isinstance(a, int) and a in known}
                free |= fresh
                known |= fresh
        return free

    def emit(self, name: str, fn, reads, writes) -> None:
        self.instructions.append(_Instruction(name, fn, tuple(reads), tuple(writes)))

    def build(self):
        ex = self.ex
        self.position = {v: i for i, v in enumerate(ex.graph.inputs)}
        self.pre_values = self.batch_independent_values()
        self.emit_splits()
        for mesh, ids in enumerate(ex._acc_ids):
            if ids:
                self.emit(f"zeros@{mesh}", ex.compile_zeros(mesh), (),
                          [self.slot(("acc", mesh, v)) for v in ids])
        programs = {TaskKind.FORWARD: ex.partition.forward,
                    TaskKind.BACKWARD: ex.partition.backward,
                    TaskKind.WEIGHT: ex.partition.weight}
        n = ex.schedule.num_stages
        for task in ex.schedule.dispatch_order():
            if task.kind is TaskKind.APPLY:
                continue
            program = programs[task.kind][task.position(n)]
            if program.nodes:
                self.emit_program(ex.compiled[program.name], task.micro_batch)
        self.emit_boundary()
        for program in ex.partition.apply:
            self.emit_program(ex.compiled[program.name], -1)
        outputs = self.output_slots()
        instructions = self.donate_state(self.with_frees({s for s, _ in outputs
                                                          if s is not None}))
        initial = [None] * len(self.slots)
        for slot, value in self.initial.items():
            initial[slot] = value
        return instructions, tuple(self.inputs), initial, outputs

    def input_slot(self, v: int, sharding: NamedSharding) -> int:
        key = ("in", v, sharding)
        if key not in self.slots:
            self.inputs.append((self.position[v], self.slot(key, sharding), sharding))
        return self.slots[key]

    def emit_splits(self) -> None:
        """One program per mesh splits the batch leaves it reads into micro-batches."""
        ex = self.ex
        first: dict[int, tuple[int, NamedSharding]] = {}  # split where first read; moved on
        for program in ex.partition.compute_programs():
            compiled = ex.compiled[program.name]
            for v, sharding in zip(program.inputs, compiled.in_shardings):
                if v in ex.batch_inputs:
                    first.setdefault(v, (program.mesh, sharding))
        wanted: dict[int, dict[int, NamedSharding]] = {}
        for v, (mesh, sharding) in first.items():
            wanted.setdefault(mesh, {})[v] = sharding
        for mesh, needs in sorted(wanted.items()):
            values, shardings = list(needs), list(needs.values())
            reads = [self.input_slot(v, s) for v, s in zip(values, shardings)]
            writes = [self.slot(("val", v, mb), s) for v, s in zip(values, shardings)
                      for mb in range(ex.k)]
            self.emit(f"split@{mesh}", ex.compile_split(shardings), reads, writes)

    def read(self, v: int, micro_batch: int, sharding: NamedSharding, moves: list) -> int:
        """The register holding ``v`` with ``sharding``; queues a move if it is elsewhere."""
        ex = self.ex
        if v in self.position and v not in ex.batch_inputs:
            return self.input_slot(v, sharding)
        candidates = (("val", v, micro_batch), ("val", v, -1))
        if v in self.pre_values:  # the same in every micro-batch: read micro-batch 0's
            candidates = (("val", v, 0),) + candidates
        key = next((key for key in candidates if key in self.slots), None)
        if key not in self.slots:
            raise RuntimeError(
                f"internal error: the pipeline schedule reads value {v} of micro-batch "
                f"{micro_batch} before any program produced it")
        source = self.slots[key]
        if self.sharding_of.get(source) == sharding:
            return source
        moved_key = ("moved", key, sharding)
        if moved_key not in self.slots:
            moves.append((source, self.slot(moved_key, sharding), sharding, v))
        return self.slots[moved_key]

    def emit_program(self, compiled: _Compiled, micro_batch: int) -> None:
        program, mesh = compiled.program, compiled.program.mesh
        moves: list = []
        reads = [self.read(v, micro_batch, s, moves)
                 for v, s in zip(program.inputs, compiled.in_shardings)]
        self.emit_moves(moves, program.name)
        if compiled.takes_index:
            reads.append(self.index_slot(mesh, micro_batch))
        accs = [self.slot(("acc", mesh, v)) for v in compiled.accumulated]
        writes = [self.slot(("val", v, micro_batch), self.ex.sharding(mesh, v))
                  for v in compiled.passed] + accs
        self.emit(program.name, compiled.fn, reads + accs, writes)

    def emit_moves(self, moves: list, name: str) -> None:
        """One batched `jax.device_put` for the moves; across processes, one jitted
        `CrossMeshMove` per (source mesh, destination mesh) pair between disjoint devices."""
        local, crossing = [], {}
        for move in moves:
            source = self.sharding_of[move[0]]
            if multi_process() and not (source.device_set & move[2].device_set):
                crossing.setdefault((source.mesh, move[2].mesh), []).append(move)
            else:
                local.append(move)
        if local:
            shardings = [m[2] for m in local]
            self.emit(f"move->{name}", lambda *xs: jax.device_put(list(xs), shardings),
                      [m[0] for m in local], [m[1] for m in local])
        for group in crossing.values():
            mover = CrossMeshMove([self.sharding_of[m[0]] for m in group],
                                  [m[2] for m in group],
                                  [self.ex.graph.avals[m[3]] for m in group])
            self.emit(f"transfer->{name}", mover, [m[0] for m in group],
                      [m[1] for m in group])

    def index_slot(self, mesh: int, micro_batch: int) -> int:
        slot = self.slot(("index", mesh, micro_batch))
        self.initial[slot] = jax.device_put(np.int32(micro_batch), self.ex.replicated(mesh))
        return slot

    def emit_boundary(self) -> None:
        """Combine the boundary's operands over micro-batches into its outputs."""
        ex = self.ex
        boundary = ex.partition.boundary
        out_of = {s: d for s, d in zip(boundary.invars, boundary.outvars) if isinstance(s, int)}
        for mesh, ids in enumerate(ex._acc_ids):
            if ids:
                self.emit(f"finish@{mesh}", ex.compile_finish(mesh),
                          [self.slot(("acc", mesh, v)) for v in ids],
                          [self.slot(("val", out_of[v], -1), ex.sharding(mesh, v)) for v in ids])
        for v, mesh in ex.partition.sinks.items():
            combine = ex.rules[v].combine
            if combine is Combine.SAME:  # the same in every micro-batch: take the first
                self.slots[("val", out_of[v], -1)] = self.slots[("val", v, 0)]
            elif combine is Combine.CONCAT:
                parts = [self.slots[("val", v, mb)] for mb in range(ex.k)]
                self.emit(f"concat@{mesh}", ex.compile_concat(mesh, v), parts,
                          [self.slot(("val", out_of[v], -1), ex.sharding(mesh, v))])

    def output_slots(self) -> list[tuple[int | None, object]]:
        ex, result = self.ex, []
        for v in ex.graph.outputs:
            if not isinstance(v, int):
                result.append((None, v.val))
            elif v in self.position:
                result.append((self.slot(("arg", v)), None))
                self.inputs.append((self.position[v], self.slots[("arg", v)], None))
            elif ("val", v, -1) in self.slots:
                result.append((self.slots[("val", v, -1)], None))
            elif v in self.pre_values and ("val", v, 0) in self.slots:
                result.append((self.slots[("val", v, 0)], None))  # the same in every micro-batch
            else:
                raise RuntimeError(f"internal error: step output {v} is produced by no program")
        return result

    def with_frees(self, keep: set[int]) -> list[_Instruction]:
        """Each register is dropped after its last reader (activations die per micro-batch)."""
        last: dict[int, int] = {}
        for i, instruction in enumerate(self.instructions):
            for slot in instruction.reads:
                last[slot] = i
        frees: dict[int, list[int]] = {}
        for slot, i in last.items():
            if slot not in keep and slot not in self.instructions[i].writes:
                frees.setdefault(i, []).append(slot)
        for i, instruction in enumerate(self.instructions):  # written, never read: drop now
            frees.setdefault(i, []).extend(s for s in instruction.writes
                                           if s not in last and s not in keep)
        return [dataclasses.replace(ins, frees=tuple(frees.get(i, ())),
                                    blocks=self.spans_processes(ins))
                for i, ins in enumerate(self.instructions)]

    def donate_state(self, instructions: list[_Instruction]) -> list[_Instruction]:
        """The apply programs reuse the buffers of the donated arguments they read last (the
        old parameters and optimizer state become the new ones), as `jax.jit` with
        ``donate_argnums`` does: the update then needs no second copy of the state."""
        ex = self.ex
        returned = {v for v in ex.graph.outputs if isinstance(v, int)}  # kept for the caller
        donated = {slot for key, slot in self.slots.items() if key[0] == "in"
                   and self.position[key[1]] in ex.donated and key[1] not in returned}
        apply = {ex.compiled[p.name].fn: ex.compiled[p.name] for p in ex.partition.apply}
        result = []
        for instruction in instructions:
            compiled = apply.get(instruction.fn)
            positions = () if compiled is None else tuple(
                i for i, slot in enumerate(instruction.reads)
                if slot in donated and slot in instruction.frees)
            if positions:
                options = dict(compiled.jit_options)
                options["donate_argnums"] = tuple(options["donate_argnums"]) + positions
                instruction = dataclasses.replace(instruction,
                                                  fn=jax.jit(compiled.body, **options))
            result.append(instruction)
        return result

    def spans_processes(self, instruction: _Instruction) -> bool:
        """Does the instruction run a collective across processes? Such programs run one at
        a time: several in flight deadlocked on CPU (see emit/transfer.py)."""
        if not multi_process():
            return False
        processes = {d.process_index for slot in instruction.reads + instruction.writes
                     if slot in self.sharding_of for d in self.sharding_of[slot].device_set}
        return len(processes) > 1
