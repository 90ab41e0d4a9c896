"""From an OpGraph to a ShardingProblem, and from the ILP's answer back to per-node strategies.

Input: `OpGraph`, a `LogicalMesh`, the roles of the inputs and a `SpecPolicy`. Output:
`PlanningProblem` (the numbers-only `ShardingProblem` plus what is needed to decode it).

Steps: (1) every input, constant and operator becomes a *unit* with a list of strategies;
marker and barrier nodes are transparent (their outputs are their inputs). (2) Units are merged
into *groups* before solving (Alpa's follow-merging, the main lever on model size): a unit whose
strategy is fixed by one operand's spec (elementwise ops, transposes, casts) follows that
operand's group, and a unit with no array operands (iota, broadcast of a scalar) follows its
first consumer. (3) Group costs, resharding edges and memory terms are summed from the units.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections import defaultdict
from typing import Sequence

import numpy as np

from alpa_lite._jax_compat import optimization_barrier_primitive
from alpa_lite.cost import estimate_op_cost
from alpa_lite.cost.collectives import Collective
from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.ilp import ShardingProblem
from alpa_lite.intra_op.memory_terms import build_memory_terms
from alpa_lite.intra_op.resharding import estimate_resharding_s, tensor_bytes
from alpa_lite.intra_op.strategies import (FactorRule, Spec, Strategy, enumerate_factor_strategies,
                                           format_spec, replicated_spec, spec_shards)
from alpa_lite.intra_op.strategy_rules import (StrategyContext, build_node_rule,
                                               enumerate_node_strategies, replicated_for)
from alpa_lite.markers import grad_boundary_p, layer_boundary_p, manual_boundary_p
from alpa_lite.mesh import LogicalMesh


class InputRole(enum.Enum):
    BATCH = "batch"
    PARAM = "param"
    OPT_STATE = "opt_state"


class SpecPolicy(enum.Enum):
    """Which strategies the planner may pick.

    AUTO: any. DATA: only batch dims are ever split; parameters and optimizer state replicated.
    ZERO2: matmuls and convolutions split batch dims only (their results may be
    reduce-scattered), optimizer state is sharded, parameters replicated. ZERO3: ZERO2 plus
    sharded parameters (gathered where they are used). MEGATRON: a 2-D ``(dp, tp)`` mesh
    with Megatron-LM's tensor parallelism: batch inputs split over the first axis only,
    every parameter of rank >= 2 split over the second axis along one of its dims (the ILP
    picks which: column- or row-parallel); the operators are the ILP's choice, which for a
    transformer block is Megatron's split (two all-reduces of the activations forward, two
    backward) and never costlier than it.
    """

    AUTO = "auto"
    DATA = "data"
    ZERO2 = "zero2"
    ZERO3 = "zero3"
    MEGATRON = "megatron"


def is_transparent(primitive) -> bool:
    """Identity-like nodes the planner looks through (markers, remat barriers)."""
    return primitive in (grad_boundary_p, layer_boundary_p, manual_boundary_p,
                         optimization_barrier_primitive())


@dataclasses.dataclass
class Unit:
    """An input, constant, operator or aliased output, with its candidate strategies."""

    name: str
    strategies: list[Strategy]
    operands: tuple  # value id or None per operand
    outputs: tuple[int, ...]
    node: int = -1  # graph node index, -1 for non-operators
    fallback: bool = False
    heavy: bool = False
    flops: float = 0.0
    repeat: int = 1  # runs per step (a scan body's trip count): its costs are multiplied


@dataclasses.dataclass
class PlanningProblem:
    """A ShardingProblem plus the bookkeeping to decode its solution."""

    problem: ShardingProblem
    units: list[Unit]
    group_of: list[int]            # unit -> group
    member_map: list[list[int]]    # unit -> (group strategy -> unit strategy)
    owner: dict[int, tuple[int, int]]  # value id -> (unit, output index)
    input_units: list[int]
    output_units: dict[int, int]   # output position -> alias unit

    def unit_strategies(self, group_choices) -> list[Strategy]:
        return [u.strategies[self.member_map[i][group_choices[self.group_of[i]]]]
                for i, u in enumerate(self.units)]


def enumerate_value_specs(aval, mesh: LogicalMesh, allow_mixed_mesh_shape: bool = True
                          ) -> list[Spec]:
    """Every spec a tensor of this shape can take on ``mesh`` (replicated first)."""
    names = tuple(f"d{i}" for i in range(len(aval.shape)))
    rule = FactorRule((), (names,), tuple(zip(names, aval.shape)))
    return [s.out_specs[0] for s in enumerate_factor_strategies(
        rule, mesh, 1, allow_mixed_mesh_shape=allow_mixed_mesh_shape)]


def shard_largest_dim(aval, mesh: LogicalMesh) -> Spec:
    """ZeRO's layout: the largest dim divisible by all devices split over every mesh axis."""
    axes = mesh.sharding_axes
    n = mesh.axes_size(axes)
    dims = sorted(range(len(aval.shape)), key=lambda d: -aval.shape[d])
    for d in dims:
        if aval.shape[d] % n == 0 and aval.shape[d] >= n:
            return tuple(axes if i == d else () for i in range(len(aval.shape)))
    return replicated_spec(len(aval.shape))


def batch_spec(aval, mesh: LogicalMesh, path: str) -> Spec:
    axes = mesh.sharding_axes
    n = mesh.axes_size(axes)
    if not aval.shape or aval.shape[0] % n:
        got = aval.shape[0] if aval.shape else "a scalar"
        raise InvalidConfigError(
            f"Batch input {path} has leading dim {got}, which is not divisible by the "
            f"data-parallel degree {n} (mesh {mesh.shape}). Use a batch size that is a multiple "
            f"of {n}, or a mesh with fewer devices on the data-parallel axes."
        )
    return (axes,) + ((),) * (len(aval.shape) - 1)


def build_planning_problem(
    graph: OpGraph,
    mesh: LogicalMesh,
    *,
    input_roles: list[InputRole],
    input_paths: list[str],
    policy: SpecPolicy = SpecPolicy.AUTO,
    alias_pairs: list[tuple[int, int]] = (),
    memory_budget_bytes: float | None = None,
    strict: bool = False,
    donated_inputs: frozenset[int] = frozenset(),
    memory_terms: bool = True,
) -> PlanningProblem:
    """Builds the ILP for ``graph`` on ``mesh``.

    Args:
        graph: the operator graph.
        mesh: the logical mesh to shard over.
        input_roles: role of each flat input (batch leaves, parameters, optimizer state).
        input_paths: readable name of each flat input, for messages.
        policy: which strategies are allowed (auto, data parallel, ZeRO-2/3).
        alias_pairs: ``(output position, input position)`` pairs that must share a sharding
            (the new state of a train step and the state it came from).
        memory_budget_bytes: per-device budget, or None.
        strict: raise instead of replicating operators that have no rule.
        donated_inputs: flat input positions donated to the step (``donate_argnums``): their
            aliased outputs reuse the input buffers and are not counted again in memory.
        memory_terms: build the liveness terms of peak memory. Without them (pricing,
            which counts memory from the chosen specs) the problem takes no memory budget
            and its solution reports no peak; they are most of the build's time.

    The objective can then be given a price on input memory (`price_input_memory`).
    """
    if not memory_terms and memory_budget_bytes is not None:
        raise InvalidConfigError("A memory budget needs the memory terms; got memory_terms=False "
                                 "with a budget. Pass memory_terms=True.")
    builder = _UnitBuilder(graph, mesh, policy, strict)
    builder.add_inputs(input_roles, input_paths)
    builder.add_nodes()
    output_units = builder.add_aliases(alias_pairs)
    loop_backs = builder.add_loop_backs()
    grouping = _Grouping(builder.units, builder.owner)
    grouping.follow_operands()
    grouping.follow_consumers(builder.consumers())
    for out_pos, unit in output_units.items():
        grouping.attach(unit, builder.input_units[dict(alias_pairs)[out_pos]])
    for unit, enter_unit in loop_backs:
        grouping.attach(unit, enter_unit)
    problem = _assemble(graph, mesh, builder, grouping, memory_budget_bytes,
                        (output_units, alias_pairs, donated_inputs) if memory_terms else None)
    return PlanningProblem(problem, builder.units, grouping.group_index(), grouping.member_map,
                           builder.owner, builder.input_units, output_units)


class _UnitBuilder:
    def __init__(self, graph: OpGraph, mesh: LogicalMesh, policy: SpecPolicy, strict: bool):
        self.graph, self.mesh, self.policy, self.strict = graph, mesh, policy, strict
        self.units: list[Unit] = []
        self.owner: dict[int, tuple[int, int]] = {}
        self.input_units: list[int] = []
        self.batch_dims: dict[int, frozenset[int]] = {}
        self.batch_dependent: set[int] = set()
        # Alpa's default: on a 2-D mesh, no dim is split over both axes at once unless a
        # data-parallel policy needs the batch split over every device.
        self.allow_mixed = policy not in (SpecPolicy.AUTO, SpecPolicy.MEGATRON)
        # Reduce-scatter strategies only where ZeRO needs them (Alpa: prefer_reduce_scatter
        # off by default); in auto mode an all-reduce followed by a free slice covers them.
        self.scatter = policy in (SpecPolicy.ZERO2, SpecPolicy.ZERO3)

    def new_unit(self, unit: Unit) -> int:
        self.units.append(unit)
        index = len(self.units) - 1
        for k, vid in enumerate(unit.outputs):
            self.owner[vid] = (index, k)
        return index

    def add_inputs(self, roles, paths) -> None:
        for vid, role, path in zip(self.graph.inputs, roles, paths):
            specs = self.input_specs(self.graph.avals[vid], role, path)
            strategies = [Strategy(format_spec(s), (), (s,)) for s in specs]
            self.input_units.append(self.new_unit(Unit(path, strategies, (), (vid,))))
            if role is InputRole.BATCH:
                self.batch_dims[vid] = frozenset({0}) if self.graph.avals[vid].shape else frozenset()
                self.batch_dependent.add(vid)
        for vid, _ in self.graph.consts:
            spec = replicated_spec(len(self.graph.avals[vid].shape))
            self.new_unit(Unit(f"const{vid}", [Strategy("replicated", (), (spec,))], (), (vid,)))

    def input_specs(self, aval, role: InputRole, path: str) -> list[Spec]:
        policy, mesh = self.policy, self.mesh
        if policy is SpecPolicy.MEGATRON and mesh.sharding_axes:
            return _megatron_input_specs(aval, role, mesh, path)
        if policy is SpecPolicy.AUTO or not mesh.sharding_axes:
            return enumerate_value_specs(aval, mesh, self.allow_mixed)
        if role is InputRole.BATCH:
            return [batch_spec(aval, mesh, path)]
        sharded = (role is InputRole.OPT_STATE and policy in (SpecPolicy.ZERO2, SpecPolicy.ZERO3)
                   or role is InputRole.PARAM and policy is SpecPolicy.ZERO3)
        if sharded:
            return [shard_largest_dim(aval, mesh)]
        return [replicated_spec(len(aval.shape))]

    def add_nodes(self) -> None:
        for node in self.graph.nodes:
            if is_transparent(node.primitive):
                self.add_transparent(node)
                continue
            avals_in = tuple(v.aval if not isinstance(v, int) else self.graph.avals[v]
                             for v in node.invars)
            avals_out = tuple(self.graph.avals[v] for v in node.outvars)
            ctx = StrategyContext(primitive=node.primitive, params=node.params,
                                  avals_in=avals_in, avals_out=avals_out)
            rule = build_node_rule(ctx)
            if isinstance(rule, FactorRule) and rule.allow_reduce_scatter and not self.scatter:
                rule = dataclasses.replace(rule, allow_reduce_scatter=False)
            strategies, fallback = enumerate_node_strategies(
                ctx, rule, self.mesh, strict=self.strict, allow_mixed_mesh_shape=self.allow_mixed)
            operands = tuple(v if isinstance(v, int) else None for v in node.invars)
            out_bdims = self.propagate_batch(rule, operands, node.outvars)
            strategies = self.filter_strategies(ctx, rule, strategies, operands, out_bdims)
            flops = estimate_op_cost(node.primitive, node.params, avals_in, avals_out).flops
            self.new_unit(Unit(f"{node.name}#{node.index}", strategies, operands, node.outvars,
                               node.index, fallback, getattr(rule, "heavy", False), flops,
                               node.repeat))

    def add_transparent(self, node) -> None:
        for src, dst in zip(node.invars, node.outvars):
            if isinstance(src, int):
                self.owner[dst] = self.owner[src]
                self.batch_dims[dst] = self.batch_dims.get(src, frozenset())
                if src in self.batch_dependent:
                    self.batch_dependent.add(dst)
            else:
                spec = replicated_spec(len(self.graph.avals[dst].shape))
                self.new_unit(Unit(f"literal{dst}", [Strategy("replicated", (), (spec,))],
                                   (), (dst,)))

    def propagate_batch(self, rule, operands, outvars) -> list[frozenset[int]]:
        """Marks the result dims that carry the batch dim (or may follow it), through the rule."""
        if any(v in self.batch_dependent for v in operands if v is not None):
            self.batch_dependent.update(outvars)
        if not isinstance(rule, FactorRule):
            return [frozenset() for _ in outvars]
        batch_factors = {
            rule.operands[i][d]
            for i, v in enumerate(operands) if v is not None and i < len(rule.operands)
            for d in self.batch_dims.get(v, ())
            if d < len(rule.operands[i]) and rule.operands[i][d] is not None
        }
        # Factors no operand has (new broadcast dims, iota dims) are free to follow the batch.
        operand_factors = {f for dims in rule.operands for f in dims}
        result = []
        for vid, dims in zip(outvars, rule.results):
            bdims = frozenset(d for d, f in enumerate(dims)
                              if f is not None and (f in batch_factors or f not in operand_factors))
            self.batch_dims[vid] = bdims
            result.append(bdims)
        return result

    def filter_strategies(self, ctx, rule, strategies, operands, out_bdims) -> list[Strategy]:
        policy = self.policy
        # DATA: every operator splits batch dims only. ZeRO: the matmuls/convs do (so the
        # computation is data parallel); gradient and optimizer ops may follow the sharded
        # optimizer state.
        restricted = policy is SpecPolicy.DATA or (
            policy in (SpecPolicy.ZERO2, SpecPolicy.ZERO3) and getattr(rule, "heavy", False))
        if restricted:
            in_bdims = [self.batch_dims.get(v, frozenset()) if v is not None else None
                        for v in operands]
            allow_scatter = policy is not SpecPolicy.DATA
            strategies = [s for s in strategies
                          if _splits_only_batch(s, in_bdims, out_bdims, allow_scatter)]
        if getattr(rule, "heavy", False):
            full = [s for s in strategies if s.work_divisor == self.mesh.num_devices]
            strategies = full or strategies
        return strategies or [replicated_for(ctx, fallback=False)]

    def add_aliases(self, alias_pairs) -> dict[int, int]:
        output_units = {}
        for out_pos, in_pos in alias_pairs:
            value = self.graph.outputs[out_pos]
            in_unit = self.input_units[in_pos]
            if not isinstance(value, int) or value == self.graph.inputs[in_pos]:
                continue
            specs = [s.out_specs[0] for s in self.units[in_unit].strategies]
            strategies = [Strategy(format_spec(s), (s,), ()) for s in specs]
            name = f"out{out_pos}<-{self.units[in_unit].name}"
            output_units[out_pos] = self.new_unit(Unit(name, strategies, (value,), ()))
        return output_units

    def add_loop_backs(self) -> list[tuple[int, int]]:
        """One unit per scan carry reading the carry after an iteration (loop invariance).

        It is put in the carry's ``loop_enter`` group, so it requires the spec the carry
        entered with; a different spec inside the body costs a resharding every iteration.
        Returns ``(loop-back unit, loop_enter unit)`` pairs.
        """
        pairs = []
        for loop in self.graph.loops:
            for enter, value in zip(loop.carry_enter, loop.carry_out):
                if not isinstance(value, int):
                    continue
                enter_unit = self.owner[self.graph.nodes[enter].outvars[0]][0]
                specs = [s.out_specs[0] for s in self.units[enter_unit].strategies]
                strategies = [Strategy(format_spec(s), (s,), ()) for s in specs]
                repeat = self.graph.nodes[enter].repeat * loop.length
                unit = self.new_unit(Unit(f"loop_back{value}->{self.units[enter_unit].name}",
                                          strategies, (value,), (), repeat=repeat))
                pairs.append((unit, enter_unit))
        return pairs

    def consumers(self) -> dict[int, list[tuple[int, int]]]:
        """value id -> [(unit, operand position)] in program order."""
        result = defaultdict(list)
        for index, unit in enumerate(self.units):
            for pos, vid in enumerate(unit.operands):
                if vid is not None:
                    result[vid].append((index, pos))
        return result


def _megatron_axes(mesh: LogicalMesh) -> tuple[str, str]:
    if len(mesh.shape) != 2:
        raise InvalidConfigError(
            f"The Megatron policy needs a 2-D (dp, tp) logical mesh; got shape {mesh.shape}. "
            "Use e.g. mesh_shape=(2, 4) for dp=2, tp=4 (a size-1 axis is fine).")
    return mesh.axis_names[0], mesh.axis_names[1]


def _megatron_input_specs(aval, role: InputRole, mesh: LogicalMesh, path: str) -> list[Spec]:
    """Batch inputs: the batch dim over the dp axis. Parameters and optimizer state: never
    over the dp axis; of rank >= 2, over the tp axis along one dim (when one divides)."""
    dp, tp = _megatron_axes(mesh)
    rank = len(aval.shape)
    if role is InputRole.BATCH:  # a layer's activations too: kept whole when they don't divide
        if mesh.axis_size(dp) == 1 or not aval.shape or aval.shape[0] % mesh.axis_size(dp):
            return [replicated_spec(rank)]
        return [batch_spec(aval, dataclasses.replace(mesh, shape=(mesh.shape[0], 1)), path)]
    specs = [s for s in enumerate_value_specs(aval, mesh, False)
             if not any(dp in axes for axes in s)]
    split = [s for s in specs if any(tp in axes for axes in s)]
    return split if rank >= 2 and split and mesh.axis_size(tp) > 1 else specs


def _splits_only_batch(strategy: Strategy, in_bdims, out_bdims, allow_scatter: bool) -> bool:
    for spec, bdims in zip(strategy.in_specs, in_bdims):
        if spec is not None and bdims is not None and any(
                axes and d not in bdims for d, axes in enumerate(spec)):
            return False
    scatters = any(c.kind is Collective.REDUCE_SCATTER for c in strategy.collectives)
    if scatters and not allow_scatter:
        return False
    for spec, bdims in zip(strategy.out_specs, out_bdims):
        if any(axes and d not in bdims for d, axes in enumerate(spec)) and not scatters:
            return False
    return True


class _Grouping:
    """Union of units into groups that share one strategy choice."""

    def __init__(self, units: list[Unit], owner: dict[int, tuple[int, int]]):
        self.units, self.owner = units, owner
        self.root = list(range(len(units)))
        self.member_map = [list(range(len(u.strategies))) for u in units]
        self.members = {i: [i] for i in range(len(units))}

    def out_specs(self, vid: int) -> list[Spec]:
        """Spec of value ``vid`` under each strategy of its producer's group."""
        unit, idx = self.owner[vid]
        strategies = self.units[unit].strategies
        return [strategies[m].out_specs[idx] for m in self.member_map[unit]]

    def in_specs(self, unit: int, pos: int) -> list[Spec | None]:
        strategies = self.units[unit].strategies
        return [strategies[m].in_specs[pos] for m in self.member_map[unit]]

    def merge(self, group: int, into: int, mapping: list[int]) -> None:
        """Moves every member of ``group`` into ``into``; mapping: into-strategy -> group-strategy."""
        for member in self.members.pop(group):
            self.member_map[member] = [self.member_map[member][k] for k in mapping]
            self.root[member] = into
            self.members[into].append(member)

    def follow_operands(self) -> None:
        for index, unit in enumerate(self.units):
            if unit.node < 0 or len(unit.strategies) < 2:
                continue
            pos = next((p for p, v in enumerate(unit.operands)
                        if v is not None and _rank(self, v) > 0), None)
            if pos is None:
                continue
            wanted = self.out_specs(unit.operands[pos])
            mapping = _unique_matches(wanted, [s.in_specs[pos] for s in unit.strategies])
            if mapping is not None:
                self.merge(index, self.root[self.owner[unit.operands[pos]][0]],
                           [mapping[k] for k in range(len(wanted))])

    def follow_consumers(self, consumers) -> None:
        for index, unit in enumerate(self.units):
            if (unit.node < 0 or self.root[index] != index or len(unit.strategies) < 2
                    or any(v is not None and _rank(self, v) > 0 for v in unit.operands)):
                continue
            for out_idx, vid in enumerate(unit.outputs):
                users = [(c, p) for c, p in consumers.get(vid, ()) if self.root[c] != index]
                if not users:
                    continue
                consumer, pos = users[0]
                wanted = self.in_specs(consumer, pos)
                mapping = _unique_matches(wanted, self.out_specs(vid))
                if mapping is not None and all(w is not None for w in wanted):
                    self.merge(index, self.root[consumer], mapping)
                    break

    def attach(self, unit: int, input_unit: int) -> None:
        """Puts an aliased-output unit into its input's group (identical strategy lists)."""
        group = self.root[input_unit]
        self.merge(unit, group, list(self.member_map[input_unit]))

    def group_index(self) -> list[int]:
        order = {root: i for i, root in enumerate(sorted(self.members))}
        return [order[self.root[u]] for u in range(len(self.units))]


def _rank(grouping: _Grouping, vid: int) -> int:
    unit, idx = grouping.owner[vid]
    spec = grouping.units[unit].strategies[0].out_specs[idx]
    return len(spec)


def _unique_matches(wanted: list, available: list) -> list[int] | None:
    """For each wanted spec, the one index in ``available`` equal to it; None if not unique."""
    index: dict = defaultdict(list)
    for i, spec in enumerate(available):
        index[spec].append(i)
    mapping = []
    for spec in wanted:
        hits = index.get(spec, ())
        if len(hits) != 1:
            return None
        mapping.append(hits[0])
    return mapping


def _assemble(graph: OpGraph, mesh: LogicalMesh, builder: _UnitBuilder, grouping: _Grouping,
              memory_budget_bytes, outputs) -> ShardingProblem:
    group_of = grouping.group_index()
    num_groups = max(group_of) + 1
    sizes = [0] * num_groups
    for u, g in enumerate(group_of):
        sizes[g] = len(grouping.member_map[u])
    costs = [np.zeros(n) for n in sizes]
    edges = []
    for u, unit in enumerate(builder.units):
        costs[group_of[u]] += [unit.repeat * unit.strategies[m].comm_s
                               for m in grouping.member_map[u]]
        for pos, vid in enumerate(unit.operands):
            if vid is None or _rank(grouping, vid) == 0:
                continue
            matrix = _resharding_matrix(grouping.out_specs(vid), grouping.in_specs(u, pos),
                                        tensor_bytes(graph.avals[vid]), mesh)
            if unit.repeat != 1:  # resharded in the loop body: every iteration
                matrix = matrix * unit.repeat
            src_group, dst_group = group_of[grouping.owner[vid][0]], group_of[u]
            if src_group == dst_group:
                costs[dst_group] += np.diag(matrix)
            elif np.any(matrix):
                edges.append((src_group, dst_group, matrix))
    terms, pair_terms = ((), ()) if outputs is None else build_memory_terms(
        graph, mesh, builder, grouping, group_of, *outputs, is_transparent=is_transparent)
    names = [""] * num_groups
    for u in reversed(range(len(builder.units))):
        names[group_of[u]] = builder.units[u].name
    return ShardingProblem(tuple(costs), tuple(edges), tuple(terms), max(len(graph.nodes), 1),
                           memory_budget_bytes, tuple(names), tuple(pair_terms))


def input_memory_bytes(graph: OpGraph, mesh: LogicalMesh, input_units: Sequence[int],
                       units: Sequence[Unit], member_map, price: Sequence[float]):
    """Yields ``(unit, per-device bytes per unit strategy, price)`` of the priced inputs."""
    for vid, unit, p in zip(graph.inputs, input_units, price):
        if p:
            total = tensor_bytes(graph.avals[vid])
            yield unit, np.array([total / spec_shards(units[unit].strategies[m].out_specs[0],
                                                      mesh) for m in member_map[unit]]), p


def price_input_memory(graph: OpGraph, mesh: LogicalMesh, planning: PlanningProblem,
                       price: Sequence[float]) -> PlanningProblem:
    """``planning`` with ``price[i] * bytes per device`` of each flat input ``i`` added to
    its group's costs: seconds per byte held, a Lagrangian price on memory (with a positive
    price the ILP trades time for sharded, lighter inputs)."""
    if not any(price):
        return planning
    costs = [np.array(c, dtype=float) for c in planning.problem.node_costs]
    for unit, num_bytes, p in input_memory_bytes(graph, mesh, planning.input_units,
                                                 planning.units, planning.member_map, price):
        costs[planning.group_of[unit]] += p * num_bytes
    return dataclasses.replace(
        planning, problem=dataclasses.replace(planning.problem, node_costs=tuple(costs)))


def _resharding_matrix(src_specs, dst_specs, num_bytes, mesh) -> np.ndarray:
    return _resharding_matrix_cached(tuple(src_specs), tuple(dst_specs), num_bytes, mesh)


@functools.lru_cache(maxsize=1 << 16)
def _resharding_matrix_cached(src_specs, dst_specs, num_bytes, mesh) -> np.ndarray:
    """R[p, q] = seconds to turn src_specs[p] into dst_specs[q] (repeated layers hit the cache)."""
    uniq_src = list(dict.fromkeys(src_specs))
    uniq_dst = list(dict.fromkeys(s for s in dst_specs if s is not None))
    small = np.array([[estimate_resharding_s(a, b, num_bytes, mesh) for b in uniq_dst]
                      for a in uniq_src]).reshape(len(uniq_src), len(uniq_dst))
    rows = [uniq_src.index(s) for s in src_specs]
    result = np.zeros((len(src_specs), len(dst_specs)))
    for j, spec in enumerate(dst_specs):
        if spec is not None:
            result[:, j] = small[rows, uniq_dst.index(spec)]
    result.flags.writeable = False
    return result
