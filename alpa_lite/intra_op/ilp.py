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
import functools
import itertools
import math
import os
import sys
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
        total_time, model.num_variables, model.num_constraints,
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


@dataclasses.dataclass
class _Model:
    """A MILP as arrays: minimise cost . x subject to row_lower <= A x <= row_upper,
    lower <= x <= upper, x[integer] integral. Rows are ``(columns, coefficients)``."""

    cost: list = dataclasses.field(default_factory=list)
    lower: list = dataclasses.field(default_factory=list)
    upper: list = dataclasses.field(default_factory=list)
    integer: list = dataclasses.field(default_factory=list)
    rows: list = dataclasses.field(default_factory=list)
    row_lower: list = dataclasses.field(default_factory=list)
    row_upper: list = dataclasses.field(default_factory=list)

    def column(self, cost: float = 0.0, upper: float = math.inf,
               integer: bool = False) -> int:
        return int(self.columns([cost], upper, integer)[0])

    def columns(self, costs, upper: float = math.inf, integer: bool = False) -> np.ndarray:
        """Columns of the given costs, all with the same bounds: their indices."""
        first, n = len(self.cost), len(costs)
        self.cost.extend(map(float, costs))
        self.lower.extend([0.0] * n)
        self.upper.extend([upper] * n)
        self.integer.extend([integer] * n)
        return np.arange(first, first + n)

    def row(self, columns, coefficients, lower: float, upper: float) -> None:
        self.rows.append((np.asarray(columns, dtype=np.int32),
                          np.asarray(coefficients, dtype=float)))
        self.row_lower.append(lower)
        self.row_upper.append(upper)

    @property
    def num_variables(self) -> int:
        return len(self.cost)

    @property
    def num_constraints(self) -> int:
        return len(self.rows)


class _ModelBuilder:
    """Turns a ShardingProblem into a `_Model` (the static part is precomputed once)."""

    def __init__(self, problem: ShardingProblem):
        self.problem = problem
        costs = [np.array(c, dtype=float) for c in problem.node_costs]
        self.edges = []  # (u, v, row_classes, col_classes, class_costs)
        for u, v, r in _merge_parallel_edges(problem.edges):
            self._add_edge(u, v, r, costs)
        self.node_costs = costs

    def _add_edge(self, u, v, r, costs):
        if not np.any(r):
            return
        n_row_classes, row_of, first_row = _row_classes(r)
        if n_row_classes == 1:
            costs[v] += r[0, :]
            return
        n_col_classes, col_of, first_col = _row_classes(r.T)
        if n_col_classes == 1:
            costs[u] += r[:, 0]
        else:
            class_costs = r[np.ix_(first_row, first_col)]
            self.edges.append((u, v, row_of, col_of, class_costs))

    def build(self, points: set[int], minimise_peak: bool = False) -> _Model:
        model = _Model()
        self.s_cols: list[np.ndarray | None] = []
        self.pair_cols: dict[int, int] = {}
        for g, costs in enumerate(self.node_costs):
            if len(costs) == 1:
                self.s_cols.append(None)
                continue
            cols = model.columns(np.zeros(len(costs)) if minimise_peak else costs, 1.0, True)
            self.s_cols.append(cols)
            model.row(cols, np.ones(len(cols)), 1.0, 1.0)
        for i, (u, v, row_of, col_of, class_costs) in enumerate(self.edges):
            self._edge_terms(model, i, u, v, row_of, col_of,
                             0.0 * class_costs if minimise_peak else class_costs)
        peak = model.column(1.0) if minimise_peak else None
        for t in sorted(points):
            self._add_memory_constraint(model, t, peak)
        return model

    def _edge_terms(self, model, i, u, v, row_of, col_of, class_costs):
        """e[a, b] for the edge's row and column classes, with the flow rows tying them to
        the two groups' choices."""
        su, sv = self.s_cols[u], self.s_cols[v]
        n_rows, n_cols = class_costs.shape
        e = model.columns(class_costs.ravel(), 1.0).reshape(n_rows, n_cols)
        for a in range(n_rows):
            members = su[row_of == a]
            model.row(np.concatenate([e[a], members]),
                      np.concatenate([np.ones(n_cols), -np.ones(len(members))]), 0.0, 0.0)
        for b in range(n_cols):
            members = sv[col_of == b]
            model.row(np.concatenate([e[:, b], members]),
                      np.concatenate([np.ones(n_rows), -np.ones(len(members))]), 0.0, 0.0)

    def _add_memory_constraint(self, model, t, peak):
        coeffs: dict = {}
        constant = 0.0
        for term in self.problem.memory_terms:
            if not term.first_point <= t <= term.last_point:
                continue
            cols = self.s_cols[term.group]
            if cols is None:
                constant += float(term.bytes_per_strategy[0])
                continue
            for x, b in zip(cols, term.bytes_per_strategy):
                coeffs[int(x)] = coeffs.get(int(x), 0.0) + float(b)
        for i, term in enumerate(self.problem.memory_pair_terms):
            if term.first_point <= t <= term.last_point:
                constant += self._add_pair_coeffs(model, i, term, coeffs)
        if peak is None:
            model.row(list(coeffs), list(coeffs.values()), -math.inf,
                      self.problem.memory_budget_bytes - constant)
        else:
            model.row(list(coeffs) + [peak], list(coeffs.values()) + [-1.0], -math.inf,
                      -constant)

    def _add_pair_coeffs(self, model, index: int, term: MemoryPairTerm, coeffs: dict) -> float:
        """Adds a pair term's bytes to ``coeffs`` (linear in s); returns its constant part."""
        src, dst = self.s_cols[term.src_group], self.s_cols[term.dst_group]
        matrix = np.asarray(term.bytes_matrix, dtype=float)
        if src is None and dst is None:
            return float(matrix[0, 0])
        if src is None or dst is None:  # one side fixed: a row or column of the matrix
            cols, column = (dst, matrix[0, :]) if src is None else (src, matrix[:, 0])
            for x, b in zip(cols, column):
                coeffs[int(x)] = coeffs.get(int(x), 0.0) + float(b)
            return 0.0
        if index not in self.pair_cols:
            # y >= m[p, q] (s_u[p] + s_v[q] - 1): y is m[choice] at the optimum, since it only
            # appears on the left of <= constraints.
            y = model.column()
            for p, q in zip(*np.nonzero(matrix)):
                model.row([y, src[p], dst[q]], [1.0, -matrix[p, q], -matrix[p, q]],
                          -float(matrix[p, q]), math.inf)
            self.pair_cols[index] = y
        y = self.pair_cols[index]
        coeffs[y] = coeffs.get(y, 0.0) + 1.0
        return 0.0

    def decode(self, values) -> tuple[int, ...]:
        """Each group's strategy from the columns' values."""
        return tuple(0 if cols is None else int(np.argmax(values[cols]))
                     for cols in self.s_cols)


def _row_classes(matrix: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """The distinct rows of ``matrix`` in sorted order (as ``np.unique(axis=0)`` sorts
    them): ``(how many, each row's class, each class's first row)``. Much cheaper than
    ``np.unique`` on the small matrices of an edge.

        >>> _row_classes(np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]))
        (2, array([1, 0, 1]), array([1, 0]))
    """
    n = matrix.shape[0]
    order = np.lexsort(matrix.T[::-1])  # stable: equal rows keep their order
    ordered = matrix[order]
    new = np.ones(n, dtype=bool)
    np.any(ordered[1:] != ordered[:-1], axis=1, out=new[1:])
    classes = np.empty(n, dtype=np.intp)
    classes[order] = np.cumsum(new) - 1
    return int(new.sum()), classes, order[new]


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
    if solver in ("auto", "highs") and _highspy() is not None:
        return None, "highs"
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


def _run_solver(model: _Model, builder: _ModelBuilder, time_limit_s, solver):
    """Solves ``model``: ``(choices or None, status, seconds, solver name)``."""
    backend, name = _make_solver(solver, time_limit_s)
    start = time.perf_counter()
    if backend is None:
        status, values = _solve_highs(model, time_limit_s)
    else:
        status, values = _solve_pulp(model, backend)
    elapsed = time.perf_counter() - start
    if status == "infeasible" or values is None:
        return None, status, elapsed, name
    return builder.decode(values), status, elapsed, name


@functools.lru_cache(maxsize=1)
def _highspy():
    """The highspy module, or None. Its first `Highs()` prints a banner on standard output;
    it is made here with that output sent nowhere."""
    try:
        import highspy
    except ImportError:
        return None
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return highspy


def _solve_highs(model: _Model, time_limit_s: float):
    """``(status, column values or None)`` from HiGHS, given the model as arrays.

    The LP relaxation is solved first: a layer's sharding ILP without memory constraints
    nearly always has an integral LP optimum (every one of 344 ILPs of a 39B GPT's layer
    pricing did), and an integral LP optimum is the ILP's optimum, found in about a third
    of branch-and-bound's time. Only a fractional one goes on to branch and bound."""
    if not model.cost:  # every group has one strategy: nothing to choose
        return "optimal", np.zeros(0)
    highspy = _highspy()
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(model.cost), len(model.rows)
    inf = highspy.kHighsInf
    lp.col_cost_ = np.array(model.cost, dtype=float)
    lp.col_lower_ = np.array(model.lower, dtype=float)
    lp.col_upper_ = np.minimum(np.array(model.upper, dtype=float), inf)
    lp.row_lower_ = np.maximum(np.array(model.row_lower, dtype=float), -inf)
    lp.row_upper_ = np.minimum(np.array(model.row_upper, dtype=float), inf)
    lengths = [len(columns) for columns, _ in model.rows]
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    lp.a_matrix_.index_ = (np.concatenate([c for c, _ in model.rows]).astype(np.int32)
                           if model.rows else np.zeros(0, np.int32))
    lp.a_matrix_.value_ = (np.concatenate([v for _, v in model.rows]) if model.rows
                           else np.zeros(0))
    integer = np.array(model.integer, dtype=bool)
    relaxed = _run_highs(highspy, lp, time_limit_s)
    if relaxed[0] == "infeasible":
        return relaxed  # the relaxation's infeasibility is the ILP's
    values = relaxed[1]
    if (relaxed[0] == "optimal" and values is not None
            and np.all(np.abs(values[integer] - np.round(values[integer])) <= _INTEGRAL_TOL)):
        values = values.copy()
        values[integer] = np.round(values[integer])
        return "optimal", values
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in integer]
    return _run_highs(highspy, lp, time_limit_s)


# how far from an integer a relaxed binary may be and still count as that integer
_INTEGRAL_TOL = 1e-7


def _run_highs(highspy, lp, time_limit_s: float):
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    if status in (highspy.HighsModelStatus.kInfeasible,
                  highspy.HighsModelStatus.kUnboundedOrInfeasible):
        return "infeasible", None
    has_solution = h.getInfo().primal_solution_status == 2  # feasible
    values = np.array(h.getSolution().col_value) if has_solution else None
    return ("optimal" if status == highspy.HighsModelStatus.kOptimal else "time_limit"), values


def _solve_pulp(model: _Model, backend):
    """``(status, column values or None)`` from a PuLP backend (CBC)."""
    lp = pulp.LpProblem("alpa_lite_sharding", pulp.LpMinimize)
    columns = [lp.add_variable(f"x{i}", 0, None if math.isinf(upper) else upper,
                               cat="Binary" if integer else "Continuous")
               for i, (upper, integer) in enumerate(zip(model.upper, model.integer))]
    lp += affine([(columns[i], c) for i, c in enumerate(model.cost) if c])
    for (cols, coefficients), lower, upper in zip(model.rows, model.row_lower, model.row_upper):
        expr = affine([(columns[int(i)], float(c)) for i, c in zip(cols, coefficients)])
        if lower == upper:
            lp += expr == lower
        elif math.isinf(lower):
            lp += expr <= upper
        else:
            lp += expr >= lower
    status = solve_model(lp, backend)
    if status == "infeasible":
        return status, None
    values = [x.value() for x in columns]
    if any(v is None for v in values):
        return status, None
    return status, np.array(values, dtype=float)
