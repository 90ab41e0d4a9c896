"""Share one strategy choice across repeated layers (the scalability lever for deep models).

Input: a `PlanningProblem`. Output: a class per ILP group such that groups in one class play
the same role in different repeats of a layer, and the *quotient* `ShardingProblem` whose
variables are the classes. Solving the quotient restricts every repeat of a layer to the same
sharding (what hand-written plans do anyway) and shrinks the ILP by about the number of
layers.

Layers are found from the model's own names: flax module paths survive in each equation's
name stack (``transpose(jvp(GPT))/block_7/attn/...``); a family ``block_0 .. block_N`` with at
least `MIN_REPEATS` members, each holding two or more matmuls, is a layer family. Inputs are
matched by key path (``params['block_7']['qkv']``). Operators outside the layers (optimizer
updates carry no names) are matched by value numbering: same primitive, shapes and params,
and operands from the same classes.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np

from alpa_lite.graph import OpGraph
from alpa_lite.intra_op.ilp import MemoryPairTerm, MemoryTerm, ShardingProblem

MIN_REPEATS = 4
_INDEXED = re.compile(r"(?<![\w])([A-Za-z][A-Za-z_]*?)_(\d+)(?![\w])")


def detect_layer_family(graph: OpGraph) -> str | None:
    """The name prefix of the repeated layers (``"block"``), or None if there is none."""
    nodes_per: dict[str, Counter] = defaultdict(Counter)
    dots_per: dict[str, Counter] = defaultdict(Counter)
    for node in graph.nodes:
        for prefix, index in set(_INDEXED.findall(node.name_stack)):
            nodes_per[prefix][index] += 1
            if node.name in ("dot_general", "conv_general_dilated"):
                dots_per[prefix][index] += 1
    best, best_nodes = None, 0
    for prefix, counts in nodes_per.items():
        heavy = [i for i in counts if dots_per[prefix][i] >= 2]
        covered = sum(counts[i] for i in heavy)
        if len(heavy) >= MIN_REPEATS and covered > best_nodes:
            best, best_nodes = prefix, covered
    return best


def _params_key(params: dict) -> str:
    items = []
    for key, value in sorted(params.items()):
        if isinstance(value, (int, float, bool, str, tuple, type(None))) or hasattr(value, "dtype"):
            items.append(f"{key}={value!r}")
    return ";".join(items)


def build_layer_classes(planning, graph: OpGraph, family: str) -> list[int]:
    """A class id per ILP group; groups with equal ids share their strategy choice."""
    pattern = re.compile(rf"(?<![\w]){re.escape(family)}_\d+(?![\w])")
    strip = lambda text: pattern.sub(f"{family}_*", text)
    unit_class: dict[int, object] = {}
    position: Counter = Counter()
    for index, unit in enumerate(planning.units):
        if unit.node >= 0:
            node = graph.nodes[unit.node]
            layer = pattern.search(node.name_stack)
            avals = tuple(str(graph.avals[v]) for v in node.outvars)
            if layer is not None:
                key = ("L", strip(node.name_stack), layer.group(0), node.name, avals)
                position[key] += 1
                unit_class[index] = key[:2] + key[3:] + (position[key],)
                continue
            operands = tuple(planning.owner[v] if v is not None else None for v in unit.operands)
            unit_class[index] = ("V", node.name, avals, _params_key(node.params),
                                 tuple(None if o is None else (unit_class[o[0]], o[1])
                                       for o in operands))
        elif not unit.operands:  # an input or constant
            unit_class[index] = ("I", strip(unit.name))
        else:  # an aliased output: tied with its input's group below
            unit_class[index] = ("O", index)
    classes: dict[tuple, int] = {}
    roots: dict[int, int] = {}
    for index, group in enumerate(planning.group_of):
        roots.setdefault(group, index)
    result = []
    for group in range(len(roots)):
        root = roots[group]
        key = (unit_class[root], len(planning.member_map[root]))
        result.append(classes.setdefault(key, len(classes)))
    return result


def build_quotient_problem(problem: ShardingProblem, group_class: list[int]) -> ShardingProblem:
    """The ILP over classes: costs summed, edges merged, self-edges folded into the diagonal."""
    num_classes = max(group_class) + 1
    costs = [None] * num_classes
    for group, cost in enumerate(problem.node_costs):
        c = group_class[group]
        costs[c] = np.array(cost, dtype=float) if costs[c] is None else costs[c] + cost
    edges = []
    for u, v, r in problem.edges:
        cu, cv = group_class[u], group_class[v]
        if cu == cv:
            costs[cu] = costs[cu] + np.diag(r)
        else:
            edges.append((cu, cv, r))
    terms = [MemoryTerm(group_class[t.group], t.bytes_per_strategy, t.first_point,
                        t.last_point) for t in problem.memory_terms]
    pair_terms = []
    for t in problem.memory_pair_terms:
        cu, cv = group_class[t.src_group], group_class[t.dst_group]
        if cu == cv:
            terms.append(MemoryTerm(cu, np.diag(t.bytes_matrix), t.first_point, t.last_point))
        else:
            pair_terms.append(MemoryPairTerm(cu, cv, t.bytes_matrix, t.first_point,
                                             t.last_point))
    names = [""] * num_classes
    for group, c in enumerate(group_class):
        names[c] = names[c] or problem.names[group]
    return ShardingProblem(tuple(costs), tuple(edges), tuple(terms), problem.num_points,
                           problem.memory_budget_bytes, tuple(names), tuple(pair_terms))
