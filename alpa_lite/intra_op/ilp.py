"""The intra-operator sharding ILP (Alpa, OSDI'22, section 4.2, problem P1), solved with PuLP.

Given groups g (merged operators) with strategy choices s_g (one-hot), node costs c_g and,
per edge (u, v), a resharding cost matrix R_uv:

    minimise   sum_g c_g . s_g + sum_(u,v) sum_(a,b) R_uv[a, b] e_uv[a, b]
    subject to sum_k s_g[k] = 1,  s_g binary
               sum_b e_uv[a, b] = sum_{p in a} s_u[p]      (row classes a of R_uv)
               sum_a e_uv[a, b] = sum_{q in b} s_v[q]      (column classes b of R_uv)
               sum_{terms live at t} m_term . s_g(term) <= M   for every liveness point t

Most memory terms belong to one group. A *pair* term (a resharded copy of a value, or a step
output whose producer's layout may differ from the output's) has bytes m[p, q] that depend on
two groups' choices; it enters the memory constraints through one continuous y per term with
y >= m[p, q] (s_u[p] + s_v[q] - 1), which equals m at the chosen (p, q) for binary s.

Strategies whose rows (columns) of R_uv are equal are grouped into one class, which keeps the
model small without weakening it; with binary s the flow constraints force e to be 0/1, so e
is continuous. Memory constraints are added lazily: solve, find the points above the budget,
add them, solve again. This module sees numbers only (numpy + pulp, no jax).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np
import pulp

from alpa_lite._pulp_compat import affine, bundled_cbc
from alpa_lite._pulp_compat import solve as solve_model
from alpa_lite.errors import InfeasiblePlanError

_MAX_MEMORY_ROUNDS = 8


@dataclasses.dataclass(frozen=True)
class MemoryTerm:
    """Bytes per device of one value, per strategy of its group, live on points first..last."""

    group: int
    bytes_per_strategy: np.ndarray
    first_point: int
    last_point: int


@dataclasses.dataclass(frozen=True)
class MemoryPairTerm:
    """Bytes per device ``bytes_matrix[p, q]`` when group ``src_group`` picks p and
    ``dst_group`` picks q, live on points first..last (a copy made by resharding)."""

    src_group: int
    dst_group: int
    bytes_matrix: np.ndarray
    first_point: int
    last_point: int


@dataclasses.dataclass(frozen=True)
class ShardingProblem:
    """The ILP's input: numbers only.

    Attributes:
        node_costs: per group, the cost (seconds) of each of its strategies.
        edges: ``(u, v, R)`` with ``R[p, q]`` the cost when u picks p and v picks q.
        memory_terms: the values whose bytes count towards peak memory.
        num_points: number of liveness points (memory terms index into ``range(num_points)``).
        memory_budget_bytes: per-device budget, or None for no memory constraint.
        names: a readable name per group (for messages).
        memory_pair_terms: values whose bytes depend on two groups' choices.
    """

    node_costs: tuple[np.ndarray, ...]
    edges: tuple[tuple[int, int, np.ndarray], ...] = ()
    memory_terms: tuple[MemoryTerm, ...] = ()
    num_points: int = 1
    memory_budget_bytes: float | None = None
    names: tuple[str, ...] = ()
    memory_pair_terms: tuple[MemoryPairTerm, ...] = ()


@dataclasses.dataclass(frozen=True)
class ShardingSolution:
    """The ILP's output.

    Attributes:
        choices: the strategy index picked for each group.
        objective: the cost of that choice (seconds).
        status: ``"optimal"``, ``"time_limit"`` (best found in time) or ``"fallback"`` (greedy).
        solver: which solver produced it.
        solve_time_s: wall time of the solve(s), excluding problem construction.
        num_variables, num_constraints: size of the last model solved.
        peak_memory_bytes: the plan's peak per-device memory.
    """

    choices: tuple[int, ...]
    objective: float
    status: str
    solver: str
    solve_time_s: float
    num_variables: int = 0
    num_constraints: int = 0
    peak_memory_bytes: float = 0.0


def evaluate_objective(problem: ShardingProblem, choices) -> float:
    """The ILP objective of a full assignment."""
    total = sum(float(c[k]) for c, k in zip(problem.node_costs, choices))
    total += sum(float(r[choices[u], choices[v]]) for u, v, r in problem.edges)
    return total


def memory_profile(problem: ShardingProblem, choices) -> np.ndarray:
    """Bytes per device live at each liveness point under ``choices``."""
    diff = np.zeros(problem.num_points + 1)
    for term in problem.memory_terms:
        b = float(term.bytes_per_strategy[choices[term.group]])
        diff[term.first_point] += b
        diff[term.last_point + 1] -= b
    for term in problem.memory_pair_terms:
        b = float(term.bytes_matrix[choices[term.src_group], choices[term.dst_group]])
        diff[term.first_point] += b
        diff[term.last_point + 1] -= b
    return np.cumsum(diff)[:-1]


def solve_brute_force(problem: ShardingProblem) -> ShardingSolution:
    """Exhaustive search (tiny problems only): the reference the ILP is tested against."""
    start = time.perf_counter()
    best, best_cost = None, math.inf
    budget = problem.memory_budget_bytes
    for choices in itertools.product(*(range(len(c)) for c in problem.node_costs)):
        cost = evaluate_objective(problem, choices)
        if cost >= best_cost:
            continue
        if budget is not None and memory_profile(problem, choices).max(initial=0) > budget:
            continue
        best, best_cost = choices, cost
    if best is None:
        raise InfeasiblePlanError("No assignment fits the memory budget.",
                                  budget_bytes=budget, min_bytes=math.nan)
    return ShardingSolution(tuple(best), best_cost, "optimal", "brute-force",
                            time.perf_counter() - start,
                            peak_memory_bytes=float(memory_profile(problem, best).max(initial=0)))


def solve_sharding_problem(problem: ShardingProblem, *, time_limit_s: float = 60.0,
                           solver: str = "auto") -> ShardingSolution:
    """Solves the ILP; returns the optimum, the best plan found in time, or a greedy fallback.

    Args:
        problem: the ILP input.
        time_limit_s: wall-clock limit per solver call.
        solver: ``"auto"`` (HiGHS when highspy is installed, else CBC), ``"highs"`` or ``"cbc"``.

    Raises:
        InfeasiblePlanError: when no plan fits ``memory_budget_bytes``; the message states the
            budget and the smallest peak memory any plan reaches.

    Example:
        >>> p = ShardingProblem(node_costs=(np.array([0.0, 1.0]), np.array([0.0, 0.0])),
        ...                     edges=((0, 1, np.array([[5.0, 0.0], [0.0, 5.0]])),))
        >>> solve_sharding_problem(p).choices
        (0, 1)
    """
    budget = problem.memory_budget_bytes
    builder = _ModelBuilder(problem)
    points: set[int] = set()
    total_time, status = 0.0, "optimal"
    lower_bound = _memory_lower_bound(problem)
    if budget is not None and lower_bound > budget:
        _raise_infeasible(problem, time_limit_s, solver)
    every_point = set(range(problem.num_points))
    for round_index in range(_MAX_MEMORY_ROUNDS + 2):
        model = builder.build(points)
        choices, status, elapsed, name = _run_solver(model, builder, time_limit_s, solver)
        total_time += elapsed
        if choices is None:
            if points:
                _raise_infeasible(problem, time_limit_s, solver)
            choices, status, name = solve_greedy(problem), "fallback", "greedy"
        profile = memory_profile(problem, choices)
        if budget is None or profile.max(initial=0) <= budget * (1 + 1e-9):
            break
        new = {int(t) for t in np.argsort(-profile)[:64] if profile[t] > budget} - points
        if not new or status == "fallback" or points == every_point:
            _raise_infeasible(problem, time_limit_s, solver)
        # constrain the worst points lazily; after that many rounds, every point at once
        points = every_point if round_index >= _MAX_MEMORY_ROUNDS - 1 else points | new
    else:
        _raise_infeasible(problem, time_limit_s, solver)
    return ShardingSolution(
        tuple(int(c) for c in choices), evaluate_objective(problem, choices), status, name,
        total_time, model.numVariables(), model.numConstraints(),
        float(profile.max(initial=0)),
    )


def solve_greedy(problem: ShardingProblem) -> tuple[int, ...]:
    """Each group in order takes the strategy cheapest given the groups already decided."""
    choices = [-1] * len(problem.node_costs)
    incoming: dict[int, list] = {}
    for u, v, r in problem.edges:
        incoming.setdefault(max(u, v), []).append((u, v, r))
    for g, costs in enumerate(problem.node_costs):
        total = np.array(costs, dtype=float)
        for u, v, r in incoming.get(g, []):
            total = total + (r[choices[u], :] if v == g else r[:, choices[v]])
        choices[g] = int(np.argmin(total))
    return tuple(choices)


def min_peak_memory(problem: ShardingProblem, *, time_limit_s: float = 60.0,
                    solver: str = "auto") -> float:
    """The smallest peak per-device memory any plan reaches (an ILP over all points)."""
    builder = _ModelBuilder(problem)
    model = builder.build(set(range(problem.num_points)), minimise_peak=True)
    choices, _, _, _ = _run_solver(model, builder, time_limit_s, solver)
    if choices is None:
        return _memory_lower_bound(problem)
    return float(memory_profile(problem, choices).max(initial=0))


def _memory_lower_bound(problem: ShardingProblem) -> float:
    diff = np.zeros(problem.num_points + 1)
    for term in problem.memory_terms:
        b = float(np.min(term.bytes_per_strategy))
        diff[term.first_point] += b
        diff[term.last_point + 1] -= b
    for term in problem.memory_pair_terms:
        b = float(np.min(term.bytes_matrix))
        diff[term.first_point] += b
        diff[term.last_point + 1] -= b
    return float(np.cumsum(diff)[:-1].max(initial=0))


def _bytes(n: float) -> str:
    """``n`` bytes in the unit that shows it (``512 B``, ``3.25 KiB``, ``1.50 MiB``...)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _raise_infeasible(problem, time_limit_s, solver):
    need = min_peak_memory(problem, time_limit_s=time_limit_s, solver=solver)
    budget = problem.memory_budget_bytes
    raise InfeasiblePlanError(
        f"No sharding plan fits the memory budget of {_bytes(budget)} per device; the "
        f"smallest peak memory any plan reaches is {_bytes(need)} per device. Raise "
        "memory_budget_per_device to at least that, use more devices, or reduce the batch "
        "size / use micro-batches.",
        budget_bytes=budget, min_bytes=need,
    )


class _ModelBuilder:
    """Turns a ShardingProblem into a PuLP model (the static part is precomputed once)."""

    def __init__(self, problem: ShardingProblem):
        self.problem = problem
        costs = [np.array(c, dtype=float) for c in problem.node_costs]
        self.const = 0.0
        self.edges = []  # (u, v, row_classes, col_classes, class_costs)
        for u, v, r in _merge_parallel_edges(problem.edges):
            self._add_edge(u, v, r, costs)
        self.node_costs = costs

    def _add_edge(self, u, v, r, costs):
        if not np.any(r):
            return
        row_keys, row_of = np.unique(r, axis=0, return_inverse=True)
        col_keys, col_of = np.unique(r, axis=1, return_inverse=True)
        if len(row_keys) == 1:
            costs[v] += r[0, :]
        elif col_keys.shape[1] == 1:
            costs[u] += r[:, 0]
        else:
            first_row = [int(np.flatnonzero(row_of == a)[0]) for a in range(row_keys.shape[0])]
            first_col = [int(np.flatnonzero(col_of == b)[0]) for b in range(col_keys.shape[1])]
            class_costs = r[np.ix_(first_row, first_col)]
            self.edges.append((u, v, row_of.ravel(), col_of.ravel(), class_costs))

    def build(self, points: set[int], minimise_peak: bool = False) -> pulp.LpProblem:
        problem = self.problem
        model = pulp.LpProblem("alpa_lite_sharding", pulp.LpMinimize)
        self.s_vars = []
        self.pair_vars: dict[int, pulp.LpVariable] = {}
        objective = []
        for g, costs in enumerate(self.node_costs):
            if len(costs) == 1:
                self.s_vars.append(None)
                continue
            vars_g = [model.add_variable(f"s{g}_{k}", 0, 1, cat="Binary") for k in range(len(costs))]
            self.s_vars.append(vars_g)
            model += affine([(x, 1.0) for x in vars_g]) == 1
            objective.extend((x, float(c)) for x, c in zip(vars_g, costs) if c)
        for i, (u, v, row_of, col_of, class_costs) in enumerate(self.edges):
            objective.extend(self._edge_terms(model, i, u, v, row_of, col_of, class_costs))
        if minimise_peak:
            peak = model.add_variable("peak", 0, None)
            model += affine([(peak, 1.0)])
        else:
            model += affine(objective)
        budget_var = peak if minimise_peak else None
        for t in sorted(points):
            self._add_memory_constraint(model, t, budget_var)
        return model

    def _edge_terms(self, model, i, u, v, row_of, col_of, class_costs):
        su, sv = self.s_vars[u], self.s_vars[v]
        n_rows, n_cols = class_costs.shape
        e = [[model.add_variable(f"e{i}_{a}_{b}", 0, 1) for b in range(n_cols)]
             for a in range(n_rows)]
        for a in range(n_rows):
            terms = [(e[a][b], 1.0) for b in range(n_cols)]
            terms += [(su[p], -1.0) for p in np.flatnonzero(row_of == a)]
            model += affine(terms) == 0
        for b in range(n_cols):
            terms = [(e[a][b], 1.0) for a in range(n_rows)]
            terms += [(sv[q], -1.0) for q in np.flatnonzero(col_of == b)]
            model += affine(terms) == 0
        return [(e[a][b], float(class_costs[a, b]))
                for a in range(n_rows) for b in range(n_cols) if class_costs[a, b]]

    def _add_memory_constraint(self, model, t, budget_var):
        coeffs: dict = {}
        constant = 0.0
        for term in self.problem.memory_terms:
            if not term.first_point <= t <= term.last_point:
                continue
            vars_g = self.s_vars[term.group]
            if vars_g is None:
                constant += float(term.bytes_per_strategy[0])
                continue
            for x, b in zip(vars_g, term.bytes_per_strategy):
                coeffs[x] = coeffs.get(x, 0.0) + float(b)
        for i, term in enumerate(self.problem.memory_pair_terms):
            if term.first_point <= t <= term.last_point:
                constant += self._add_pair_coeffs(model, i, term, coeffs)
        expr = affine(list(coeffs.items()))
        if budget_var is None:
            model += expr <= self.problem.memory_budget_bytes - constant
        else:
            model += expr - budget_var <= -constant

    def _add_pair_coeffs(self, model, index: int, term: MemoryPairTerm, coeffs: dict) -> float:
        """Adds a pair term's bytes to ``coeffs`` (linear in s); returns its constant part."""
        src, dst = self.s_vars[term.src_group], self.s_vars[term.dst_group]
        matrix = np.asarray(term.bytes_matrix, dtype=float)
        if src is None and dst is None:
            return float(matrix[0, 0])
        if src is None or dst is None:  # one side fixed: a row or column of the matrix
            vars_g, column = (dst, matrix[0, :]) if src is None else (src, matrix[:, 0])
            for x, b in zip(vars_g, column):
                coeffs[x] = coeffs.get(x, 0.0) + float(b)
            return 0.0
        if index not in self.pair_vars:
            # y >= m[p, q] (s_u[p] + s_v[q] - 1): y is m[choice] at the optimum, since it only
            # appears on the left of <= constraints.
            y = model.add_variable(f"m{index}", 0, None)
            for p, q in zip(*np.nonzero(matrix)):
                model += affine(
                    [(y, 1.0), (src[p], -matrix[p, q]), (dst[q], -matrix[p, q])]
                ) >= -float(matrix[p, q])
            self.pair_vars[index] = y
        coeffs[self.pair_vars[index]] = coeffs.get(self.pair_vars[index], 0.0) + 1.0
        return 0.0

    def decode(self) -> tuple[int, ...] | None:
        choices = []
        for vars_g in self.s_vars:
            if vars_g is None:
                choices.append(0)
                continue
            values = [x.value() for x in vars_g]
            if any(v is None for v in values):
                return None
            choices.append(int(np.argmax(values)))
        return tuple(choices)


def _merge_parallel_edges(edges):
    merged: dict[tuple[int, int], np.ndarray] = {}
    for u, v, r in edges:
        if u == v:
            raise ValueError(f"Edge from group {u} to itself; fold it into the node cost.")
        if u > v:
            u, v, r = v, u, np.asarray(r).T
        key = (u, v)
        merged[key] = merged[key] + r if key in merged else np.array(r, dtype=float)
    return [(u, v, r) for (u, v), r in merged.items()]


def _make_solver(solver: str, time_limit_s: float):
    if solver in ("auto", "highs") and pulp.HiGHS(msg=False).available():
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s), "highs"
    if solver == "highs":
        raise ValueError("solver='highs' needs the highspy package: pip install highspy")
    coin = pulp.COIN_CMD(msg=False, timeLimit=time_limit_s)
    if coin.available():
        return coin, "cbc"
    cbc = bundled_cbc(time_limit_s)
    if cbc is None:
        raise RuntimeError(
            "No MILP solver found: expected HiGHS (pip install highspy) or CBC (a `cbc` binary "
            f"on PATH); PuLP {pulp.__version__} bundles neither.")
    return cbc, "cbc"


def _run_solver(model, builder, time_limit_s, solver):
    backend, name = _make_solver(solver, time_limit_s)
    start = time.perf_counter()
    status = solve_model(model, backend)
    elapsed = time.perf_counter() - start
    if status == "infeasible":
        return None, "infeasible", elapsed, name
    return builder.decode(), status, elapsed, name
