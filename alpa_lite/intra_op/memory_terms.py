"""Per-device memory of a sharding plan as ILP memory terms: what the SPMD program holds.

Input: the units and groups of a `PlanningProblem` under construction. Output: `MemoryTerm`s
and `MemoryPairTerm`s over liveness points (one point per graph node), so that
`memory_profile(problem, choices).max()` predicts the per-device footprint XLA reports as
``argument + output + temp - alias`` bytes of ``compiled.memory_analysis()``:

* arguments: every input at its (sharded) spec, live for the whole program;
* outputs: every step output at its *output* spec, live from its producer to the end. XLA
  allocates output buffers for the whole program, but temporaries may use their space before
  they are written, so counting an output from its producer on models both. A donated input's
  aliased output shares the input's buffer and is not counted again;
* temporaries: values that need a buffer of their own (see below), live from their producer to
  their last (possibly fused) use; resharded copies (e.g. ZeRO-3's gathered parameters) from
  the first consumer that needs the copy to the next consumer of the value; the unreduced
  partial result of a reduce-scatter at its operator.

XLA fuses chains of elementwise and layout operators into the operator that consumes them, so
their intermediate results never get a buffer: a value produced by such an operator and read
by exactly one such operator or reduction is not counted (its operands instead stay live
until the fused consumer runs). A fusible value whose reader needs another spec is materialised for the
collective. What is not modelled: the exact choices of XLA's fusion heuristics (duplication
vs. materialisation of values read many times; XLA:CPU's custom reduction fusions, which read
some broadcasts as materialised buffers), its scheduler (which may compute a broadcast of a
parameter at the start of the program and keep it until the backward pass, or move
collectives), buffer reuse across differently shaped values (temporaries placed in output
buffers before those are written are modelled; other sharing is not) and allocator
fragmentation. So the prediction is an estimate (within 25 % of XLA's footprint on gpt-tiny
presets for every ShardParallel-family method, see tests/intra_op/test_memory_accuracy.py),
not a bound.
"""

from __future__ import annotations

import numpy as np
from jax.extend.core import primitives as prims

from alpa_lite.cost import is_fused
from alpa_lite.cost.collectives import Collective
from alpa_lite.intra_op.ilp import MemoryPairTerm, MemoryTerm
from alpa_lite.intra_op.resharding import tensor_bytes
from alpa_lite.intra_op.strategies import spec_shards
from alpa_lite.markers import grad_boundary_p, layer_boundary_p, manual_boundary_p

# Operators XLA fuses into their consumers (loop fusion): their results need no buffer when
# every reader can take them fused. Wider than the compute model's `is_fused`: a fused
# transpose, slice, pad or concatenation still moves its bytes (priced as time) but holds no
# buffer of its own. (The markers `is_fused` accepts are transparent: the planner looks
# through them.)
_MARKERS = frozenset((grad_boundary_p, layer_boundary_p, manual_boundary_p))
_FUSIBLE_DATA_MOVEMENT = frozenset((
    prims.transpose_p, prims.slice_p, prims.pad_p, prims.concatenate_p, prims.rev_p))
# Reductions take a fusible producer into their own (reduction) fusion.
_FUSING_REDUCTIONS = frozenset((
    prims.reduce_sum_p, prims.reduce_max_p, prims.reduce_min_p, prims.reduce_prod_p,
    prims.reduce_and_p, prims.reduce_or_p, prims.argmax_p, prims.argmin_p,
))


def is_fusible(primitive) -> bool:
    """Does XLA fuse ``primitive``'s result into its consumer (no buffer of its own)?"""
    return ((is_fused(primitive) and primitive not in _MARKERS)
            or primitive in _FUSIBLE_DATA_MOVEMENT)


def fuses_its_producer(primitive) -> bool:
    """Does a reader with ``primitive`` take a fusible producer into its own fusion?"""
    return is_fusible(primitive) or primitive in _FUSING_REDUCTIONS


def find_fused_values(graph, is_transparent) -> set[int]:
    """Values XLA computes inside the fusion of their reader (no buffer of their own).

    A result of a fusible operator (elementwise, broadcast, reshape, transpose, ...) that
    exactly one operator reads, and that operator can fuse it (another fusible operator or a
    reduction), is computed inside that reader's fusion. A value read by several operators
    (e.g. the residual stream, read by the next layer and by the backward pass) gets a buffer:
    XLA duplicates only cheap producers into several fusions, and those duplicates would keep
    their own operands live instead, so the buffer is the better estimate.
    """
    readers: dict[int, dict[int, object]] = {}
    for node in graph.nodes:
        for v in node.invars:
            if isinstance(v, int):
                readers.setdefault(v, {})[node.index] = node.primitive
    outputs = {v for v in graph.outputs if isinstance(v, int)}
    fused = set()
    for node in graph.nodes:
        if not is_fusible(node.primitive) or is_transparent(node.primitive):
            continue
        for vid in node.outvars:
            users = list(readers.get(vid, {}).values())
            if vid not in outputs and len(users) == 1 and fuses_its_producer(users[0]):
                fused.add(vid)
    return fused


def estimate_last_use(graph, fused: set[int], is_transparent) -> np.ndarray:
    """value id -> last point it must stay live: its last reader, extended through readers
    that are fused (or transparent), since those read it when their own consumer runs."""
    last_use = graph.last_use()
    for node in reversed(graph.nodes):
        if is_transparent(node.primitive):
            for src, dst in zip(node.invars, node.outvars):
                if isinstance(src, int):
                    last_use[src] = max(last_use[src], last_use[dst])
            continue
        fused_last = max((last_use[v] for v in node.outvars if v in fused), default=-1)
        if fused_last >= 0:
            for src in node.invars:
                if isinstance(src, int):
                    last_use[src] = max(last_use[src], fused_last)
    return last_use


def build_memory_terms(graph, mesh, builder, grouping, group_of, output_units,
                       alias_pairs, donated_inputs=frozenset(), *, is_transparent):
    """All memory terms of a planning problem (see the module docstring).

    Args:
        graph: the operator graph.
        mesh: the logical mesh.
        builder: the `_UnitBuilder` (units, owner, inputs, consumers).
        grouping: the `_Grouping` (specs per group strategy).
        group_of: unit -> ILP group.
        output_units: output position -> aliased-output unit.
        alias_pairs: ``(output position, input position)`` pairs.
        donated_inputs: flat input positions whose buffers are donated to their aliased output.
        is_transparent: the planner's predicate for identity-like nodes it looks through.

    Returns:
        ``(terms, pair_terms)``.
    """
    last_point = max(len(graph.nodes) - 1, 0)
    fused = find_fused_values(graph, is_transparent)
    last_use = estimate_last_use(graph, fused, is_transparent)
    aliased_out = {graph.outputs[pos]: unit for pos, unit in output_units.items()}
    plain_out = {v for pos, v in enumerate(graph.outputs)
                 if isinstance(v, int) and pos not in output_units}
    always_live = set(graph.inputs) | {vid for vid, _ in graph.consts}
    terms, pair_terms = [], []
    for vid, (unit, idx) in builder.owner.items():
        if builder.units[unit].outputs[idx] != vid:
            continue  # an alias of another value: counted once, at its source
        specs = grouping.out_specs(vid)
        per_strategy = _bytes_per_spec(graph.avals[vid], specs, mesh)
        if vid in fused:
            _add_unfused_for_resharding(graph, vid, specs, per_strategy, builder, grouping,
                                        group_of, terms, pair_terms)
            continue
        first = max(graph.producer[vid], 0)
        if vid in always_live or vid in plain_out:
            first = 0 if vid in always_live else first
            terms.append(MemoryTerm(group_of[unit], per_strategy, first, last_point))
        elif vid in aliased_out:
            # The output buffer is counted below at the output's spec; the producer's result
            # is a separate temporary only where its spec differs (resharded into the output).
            out_unit = aliased_out[vid]
            out_specs = grouping.in_specs(out_unit, 0)
            matrix = np.array([[0.0 if s == o else b for o in out_specs]
                               for s, b in zip(specs, per_strategy)])
            last = min(max(_last_reader(graph, vid, last_use), first), last_point)
            _add_pair(terms, pair_terms, group_of[unit], group_of[out_unit], matrix, first, last)
        else:
            last = min(max(int(last_use[vid]), first), last_point)
            terms.append(MemoryTerm(group_of[unit], per_strategy, first, last))
    in_pos = dict(alias_pairs)
    for pos, out_unit in output_units.items():
        if in_pos[pos] in donated_inputs:
            continue  # written into the donated input's buffer
        vid = graph.outputs[pos]
        per_strategy = _bytes_per_spec(graph.avals[vid], grouping.in_specs(out_unit, 0), mesh)
        terms.append(MemoryTerm(group_of[out_unit], per_strategy,
                                min(max(graph.producer[vid], 0), last_point), last_point))
    _add_resharding_terms(graph, mesh, builder, grouping, group_of, terms, pair_terms)
    _add_workspace_terms(builder, grouping, group_of, terms)
    return terms, pair_terms


def _bytes_per_spec(aval, specs, mesh) -> np.ndarray:
    nbytes = tensor_bytes(aval)
    return np.array([nbytes / spec_shards(s, mesh) for s in specs], dtype=float)


def _last_reader(graph, vid: int, last_use) -> int:
    """The last point an operator (not the step's output) reads ``vid``."""
    last = int(last_use[vid])
    return graph.producer[vid] if last >= len(graph.nodes) else last


def _add_pair(terms, pair_terms, src, dst, matrix, first, last) -> None:
    if not np.any(matrix):
        return
    if src == dst:
        terms.append(MemoryTerm(src, np.diag(matrix).copy(), first, last))
    else:
        pair_terms.append(MemoryPairTerm(src, dst, matrix, first, last))


def _add_unfused_for_resharding(graph, vid, specs, per_strategy, builder, grouping, group_of,
                                terms, pair_terms) -> None:
    """A fusible value whose reader wants another spec is materialised for the collective."""
    for u, unit in enumerate(builder.units):
        if unit.node < 0 or vid not in unit.operands:
            continue
        wanted = grouping.in_specs(u, unit.operands.index(vid))
        matrix = np.array([[0.0 if w is None or w == s else b for w in wanted]
                           for s, b in zip(specs, per_strategy)])
        first = max(graph.producer[vid], 0)
        _add_pair(terms, pair_terms, group_of[grouping.owner[vid][0]], group_of[u], matrix,
                  first, max(unit.node, first))


def _add_resharding_terms(graph, mesh, builder, grouping, group_of, terms, pair_terms):
    """Copies made where a reader needs another spec than the producer's.

    XLA makes one copy per (value, spec) and keeps it while readers need it, so the copy a
    reader asks for is counted from that reader to the value's next reader (which then
    counts its own copy, if it needs one): consecutive readers that want the same layout
    (a parameter gathered for the forward and the backward pass) hold one copy, not several.
    """
    last_point = max(len(graph.nodes) - 1, 0)
    readers: dict[int, list[tuple[int, int, int]]] = {}
    for u, unit in enumerate(builder.units):
        if unit.node < 0:
            continue
        seen = set()
        for pos, vid in enumerate(unit.operands):
            if vid is None or vid in seen or not graph.avals[vid].shape:
                continue
            seen.add(vid)
            readers.setdefault(vid, []).append((unit.node, u, pos))
    for vid, uses in readers.items():
        src_unit = grouping.owner[vid][0]
        src_specs = grouping.out_specs(vid)
        nbytes = tensor_bytes(graph.avals[vid])
        uses.sort()
        for i, (point, u, pos) in enumerate(uses):
            dst_specs = grouping.in_specs(u, pos)
            matrix = np.array([[0.0 if d is None or d == s else nbytes / spec_shards(d, mesh)
                                for d in dst_specs] for s in src_specs])
            end = uses[i + 1][0] - 1 if i + 1 < len(uses) else point
            _add_pair(terms, pair_terms, group_of[src_unit], group_of[u], matrix,
                      min(point, last_point), min(max(end, point), last_point))


def _add_workspace_terms(builder, grouping, group_of, terms) -> None:
    """The unreduced partial result a reduce-scatter strategy holds at its operator."""
    for u, unit in enumerate(builder.units):
        if unit.node < 0:
            continue
        per_strategy = np.array([
            sum(c.num_bytes for c in unit.strategies[m].collectives
                if c.kind is Collective.REDUCE_SCATTER)
            for m in grouping.member_map[u]], dtype=float)
        if np.any(per_strategy):
            terms.append(MemoryTerm(group_of[u], per_strategy, unit.node, unit.node))
