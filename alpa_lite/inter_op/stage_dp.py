"""Stage construction: split layers into pipeline stages and give each stage a submesh.

Input: a `StageProblem` (numbers only: per-stage costs and memory limits). Output: a
`StageSolution`. This is the inter-operator pass of Alpa (OSDI'22, section 5),
written for numpy; it never imports jax.

Notation: ``L`` layers, ``D`` devices, submesh ``j`` has ``n_j`` devices, ``B`` micro-batches,
``c(k, i, j)`` is the time of one micro-batch (forward + backward) through layers ``k..i`` on
submesh ``j`` and ``M(k, i, j)`` the most stages that may follow that stage before its
activations stop fitting in memory. A plan cuts layers ``0..L-1`` into contiguous stages
``p = 1..S`` with times ``t_p``, uses every device exactly once (``sum_p n_{j_p} = D``) and
respects ``M(k_p, i_p, j_p) >= S - p``. Its pipeline latency is::

    T = sum_p t_p + (B - 1) * max_p t_p

(fill and drain once, then ``B - 1`` more micro-batches paced by the slowest stage).

Outer loop: fix a bound ``t_max`` on every stage time; then the best plan minimises the sum
``F(t_max)``, and ``T* = min over t_max of F(t_max) + (B - 1) t_max``, where ``t_max`` ranges
over the distinct finite stage costs. For one ``t_max`` the recurrence, with ``s`` the number of
stages left, is::

    F(0, L, 0) = 0,   F(0, k, d) = inf otherwise,
    F(s, k, d) = min over i >= k and j with n_j <= d, c(k, i, j) <= t_max and
                 M(k, i, j) >= s - 1 of  c(k, i, j) + F(s - 1, i + 1, d - n_j),
    F(t_max) = min over s of F(s, 0, D).

Two exact reformulations make it fast:

* Allowance instead of stage count. ``G(k, d, a) = min over s <= a of F(s, k, d)`` obeys
  ``G(k, d, a) = min over (i, j) of c(k, i, j) + G(i + 1, d - n_j, min(a - 1, M(k, i, j)))``
  and ``F(t_max) = G(0, D, inf)`` (or ``G(0, D, max_num_stages)``). At most
  ``min(L - 1 - i, D - n_j)`` stages can follow stage ``(k, i, j)``, so larger limits never bind
  and ``a`` takes only the values ``0 .. A - 1`` and ``inf``, where ``A - 1`` is the largest limit
  that can bind. Without limits ``a`` is always ``inf`` and that dimension disappears. The DP
  runs over ``k`` from ``L - 1`` down to 0, vectorised over ``(i, a, d)``: O(L^2 S A D) work.
  If the plan that ignores the limits happens to respect them, it is optimal and the DP with
  the allowance dimension is skipped.
* Branch and bound over ``t_max`` instead of Alpa's linear scan with the early stop
  ``B t_max >= best``. ``F`` does not increase with ``t_max``, so for untried bounds strictly
  between tried ``t_a < t_b`` every candidate is at least
  ``max(F(t_b) + (B - 1) t_{a+1}, B t_{a+1})`` (the second term: the optimal plan's own largest
  stage ``t*`` satisfies ``T* >= B t*``). Intervals whose bound reaches the best plan found are
  dropped; the others are bisected. Solving at ``t_max`` also settles every bound between the
  returned plan's largest stage ``t'`` and ``t_max``, since ``F(t') = F(t_max)``.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import numbers
from typing import Any, NoReturn

import numpy as np

from alpa_lite.errors import InfeasiblePlanError, InvalidConfigError

Stage = tuple[int, int, int]


def enumerate_submesh_shapes(num_hosts: int, devices_per_host: int) -> list[tuple[int, int]]:
    """Submesh shapes a stage may use: ``(1, 2^k)`` within one host, then whole hosts.

    Args:
        num_hosts: hosts in the cluster.
        devices_per_host: devices on each host.

    Returns:
        ``(1, 1), (1, 2), (1, 4), ...`` up to ``devices_per_host``, then ``(n, devices_per_host)``
        for ``n = 2 .. num_hosts``. When `devices_per_host` is not a power of two, the full host
        ``(1, devices_per_host)`` is added after the powers of two so that one whole host remains
        a choice.

    Raises:
        InvalidConfigError: if a count is not a positive integer.

    Example:
        >>> enumerate_submesh_shapes(2, 8)
        [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8)]
    """
    num_hosts = _check_positive_int(num_hosts, "num_hosts")
    devices_per_host = _check_positive_int(devices_per_host, "devices_per_host")
    shapes = []
    width = 1
    while width <= devices_per_host:
        shapes.append((1, width))
        width *= 2
    if shapes[-1] != (1, devices_per_host):
        shapes.append((1, devices_per_host))
    shapes.extend((hosts, devices_per_host) for hosts in range(2, num_hosts + 1))
    return shapes


@dataclasses.dataclass(frozen=True, eq=False)
class StageProblem:
    """The numbers the stage-construction DP needs (see the module docstring for symbols).

    Attributes:
        num_layers: ``L``, layers in execution order.
        num_devices: ``D``, devices the plan must use exactly.
        num_micro_batches: ``B``, micro-batches per training step.
        submesh_sizes: ``n_j``, devices of each candidate submesh; the index is the submesh id.
        stage_cost_s: shape ``(L, L, S)``; ``[k, i, j]`` is the time in seconds of one
            micro-batch (forward + backward) through layers ``k..i`` on submesh ``j``, for
            ``k <= i``; ``np.inf`` marks an infeasible stage. Entries with ``k > i`` are ignored.
        max_n_succ_stages: None (no memory limit) or shape ``(L, L, S)``: the stage fits in
            memory only if at most ``[k, i, j]`` stages follow it (1F1B keeps that many plus
            one micro-batches of its activations alive). ``np.inf`` means no limit; a negative
            value means the stage never fits.

    Example:
        >>> cost_s = np.full((2, 2, 1), np.inf)
        >>> cost_s[0, 0, 0], cost_s[1, 1, 0], cost_s[0, 1, 0] = 1.0, 1.0, 2.5
        >>> problem = StageProblem(2, 2, 4, (1,), cost_s)
        >>> solve_stage_dp(problem).stages
        ((0, 0, 0), (1, 1, 0))
    """

    num_layers: int
    num_devices: int
    num_micro_batches: int
    submesh_sizes: tuple[int, ...]
    stage_cost_s: np.ndarray
    max_n_succ_stages: np.ndarray | None = None

    def __post_init__(self):
        for name in ("num_layers", "num_devices", "num_micro_batches"):
            object.__setattr__(self, name, _check_positive_int(getattr(self, name), name))
        sizes = tuple(self.submesh_sizes)
        if not sizes:
            raise InvalidConfigError(
                "Expected at least one submesh size; got submesh_sizes=(). "
                "Pass e.g. submesh_sizes=(1, 2, 4, 8)."
            )
        sizes = tuple(_check_positive_int(size, "every submesh size") for size in sizes)
        object.__setattr__(self, "submesh_sizes", sizes)
        shape = (self.num_layers, self.num_layers, len(sizes))
        cost_s = _check_table(self.stage_cost_s, shape, "stage_cost_s")
        object.__setattr__(self, "stage_cost_s", cost_s)
        if self.max_n_succ_stages is not None:
            limits = _check_table(self.max_n_succ_stages, shape, "max_n_succ_stages")
            object.__setattr__(self, "max_n_succ_stages", limits)
        if np.any(self.stage_cost_s < 0):
            raise InvalidConfigError(
                f"Expected stage costs >= 0 seconds; got a minimum of {self.stage_cost_s.min()}. "
                "Use np.inf, not a negative number, to mark an infeasible stage."
            )

    @property
    def num_submeshes(self) -> int:
        return len(self.submesh_sizes)


@dataclasses.dataclass(frozen=True)
class StageSolution:
    """A stage plan and its predicted pipeline latency.

    Attributes:
        stages: ``(start_layer, end_layer_inclusive, submesh_id)`` per stage, in layer order.
        cost_s: ``sum_p t_p + (B - 1) * max_p t_p`` in seconds.
        max_stage_cost_s: ``max_p t_p``, the time of the slowest stage.
    """

    stages: tuple[Stage, ...]
    cost_s: float
    max_stage_cost_s: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "stages": [list(stage) for stage in self.stages],
            "cost_s": self.cost_s,
            "max_stage_cost_s": self.max_stage_cost_s,
        }


def solve_stage_dp(
    problem: StageProblem,
    *,
    max_num_stages: int | None = None,
    optimality_gap: float = 0.0,
) -> StageSolution:
    """Finds the stage plan of least pipeline latency (recurrence in the module docstring).

    Args:
        problem: layers, devices, micro-batches, stage costs and memory limits.
        max_num_stages: the most stages a plan may have; None for no limit.
        optimality_gap: 0 (the default) returns an optimal plan. A value ``g > 0`` stops the
            search over ``t_max`` once no untried bound can beat the best plan by more than a
            factor ``1 + g``, so the result costs at most ``(1 + g)`` times the optimum.

    Returns:
        An optimal plan (within `optimality_gap`).

    Raises:
        InfeasiblePlanError: if no plan uses exactly ``num_devices`` devices within the
            stage costs, memory limits and `max_num_stages`.
        InvalidConfigError: if `max_num_stages` or `optimality_gap` is invalid.

    Example:
        >>> cost_s = np.full((2, 2, 2), np.inf)
        >>> cost_s[0, 0], cost_s[1, 1], cost_s[0, 1] = (1.0, 0.6), (3.0, 1.6), (4.0, 2.2)
        >>> solution = solve_stage_dp(StageProblem(2, 2, 8, (1, 2), cost_s))
        >>> solution.stages, solution.cost_s
        (((0, 1, 1),), 17.6)
    """
    if max_num_stages is not None:
        max_num_stages = _check_positive_int(max_num_stages, "max_num_stages")
    if not (isinstance(optimality_gap, numbers.Real) and 0 <= optimality_gap < math.inf):
        raise InvalidConfigError(
            f"Expected optimality_gap >= 0 (0 = exact); got {optimality_gap!r}. "
            "Pass e.g. optimality_gap=0.01 to accept plans within 1% of the optimum."
        )
    tables = _build_tables(problem, max_num_stages)
    thresholds_s = np.unique(tables.cost_s[np.isfinite(tables.cost_s)])
    stages = None
    if thresholds_s.size:
        stages = _search_thresholds(
            problem,
            tables,
            thresholds_s,
            max_num_stages=max_num_stages,
            optimality_gap=float(optimality_gap),
        )
    if stages is None:
        _raise_infeasible(problem, max_num_stages)
    return _make_solution(problem, stages)


def solve_stage_brute_force(
    problem: StageProblem, *, max_num_stages: int | None = None
) -> StageSolution:
    """Enumerates every contiguous partition and submesh choice; for tests and tiny problems.

    Args:
        problem: as for `solve_stage_dp`.
        max_num_stages: the most stages a plan may have; None for no limit.

    Returns:
        An optimal plan.

    Raises:
        InfeasiblePlanError: if no plan is feasible.
    """
    cost_s, sizes = problem.stage_cost_s, problem.submesh_sizes
    best: list[Any] = [math.inf, None]
    stages: list[Stage] = []

    def extend(start: int, devices_left: int) -> None:
        if start == problem.num_layers:
            if devices_left == 0 and _fits(problem, stages, max_num_stages):
                latency_s = _latency_s(problem, stages)
                if latency_s < best[0]:
                    best[:] = [latency_s, tuple(stages)]
            return
        for end in range(start, problem.num_layers):
            for mesh_id, size in enumerate(sizes):
                if size <= devices_left and math.isfinite(cost_s[start, end, mesh_id]):
                    stages.append((start, end, mesh_id))
                    extend(end + 1, devices_left - size)
                    stages.pop()

    extend(0, problem.num_devices)
    if best[1] is None:
        _raise_infeasible(problem, max_num_stages)
    return _make_solution(problem, best[1])


# --- shared helpers --------------------------------------------------------------------------


def _latency_s(problem: StageProblem, stages: Any) -> float:
    """``sum_p t_p + (B - 1) * max_p t_p``, summed exactly so every solver agrees to the bit."""
    times_s = [float(problem.stage_cost_s[stage]) for stage in stages]
    return math.fsum(times_s) + (problem.num_micro_batches - 1) * max(times_s)


def _fits(problem: StageProblem, stages: list[Stage], max_num_stages: int | None) -> bool:
    if max_num_stages is not None and len(stages) > max_num_stages:
        return False
    if problem.max_n_succ_stages is None:
        return True
    return all(
        problem.max_n_succ_stages[stage] >= len(stages) - 1 - position
        for position, stage in enumerate(stages)
    )


def _make_solution(problem: StageProblem, stages: Any) -> StageSolution:
    stages = tuple((int(k), int(i), int(j)) for k, i, j in stages)
    max_stage_cost_s = max(float(problem.stage_cost_s[stage]) for stage in stages)
    return StageSolution(stages, _latency_s(problem, stages), max_stage_cost_s)


def _raise_infeasible(problem: StageProblem, max_num_stages: int | None) -> NoReturn:
    limits = "no memory limits" if problem.max_n_succ_stages is None else "the memory limits"
    stage_limit = "" if max_num_stages is None else f", at most {max_num_stages} stages"
    raise InfeasiblePlanError(
        f"No stage plan puts {problem.num_layers} layers on exactly {problem.num_devices} "
        f"devices with submesh sizes {problem.submesh_sizes}, {limits}{stage_limit} and "
        f"{int(np.isfinite(problem.stage_cost_s).sum())} finite stage costs. Expected some "
        "contiguous split of the layers whose submesh sizes sum to num_devices and whose stages "
        "fit in memory. Fix: add submesh sizes that can sum to num_devices, use fewer devices, "
        "raise the per-device memory budget, or cut the model into more layers.",
        budget_bytes=math.nan,
        min_bytes=math.nan,
    )


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise InvalidConfigError(
        f"Expected {name} to be a positive integer; got {value!r}. Pass 1 or more."
    )


def _check_table(values: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    table = np.array(values, dtype=np.float64)
    if table.shape != shape:
        raise InvalidConfigError(
            f"Expected {name} of shape (num_layers, num_layers, num_submeshes) = {shape}; "
            f"got {table.shape}. Index it as [start_layer, end_layer, submesh_id]."
        )
    if np.isnan(table).any():
        raise InvalidConfigError(
            f"Expected {name} without NaN; got {int(np.isnan(table).sum())} NaN entries. "
            "Use np.inf for an infeasible stage or for no memory limit."
        )
    table.flags.writeable = False
    return table


# --- the DP for one t_max --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Tables:
    """The problem recast for the DP.

    Attributes:
        cost_s: ``(L, L, S')`` costs of usable stages (``k <= i``, ``n_j <= D``, fits in memory
            with no stage after it); np.inf elsewhere. Only submeshes with ``n_j <= D`` are kept.
        mesh_ids: ``(S',)`` original submesh id of each kept submesh.
        sizes: ``(S',)`` devices of each kept submesh.
        limit: ``(L, L, S')`` allowance index of ``M``: ``0 .. A - 1`` a limit that can bind,
            ``A`` no limit (never-fitting stages have cost np.inf and index 0).
        num_finite: ``A``, the number of finite allowance values; index ``A`` means unlimited.
        top: allowance index of the whole plan (``max_num_stages`` or unlimited).
    """

    cost_s: np.ndarray
    mesh_ids: np.ndarray
    sizes: np.ndarray
    limit: np.ndarray
    num_finite: int
    top: int

    def relaxed(self) -> _Tables:
        """The same tables with every memory and stage-count limit dropped."""
        return dataclasses.replace(self, limit=np.zeros_like(self.limit), num_finite=0, top=0)


def _build_tables(problem: StageProblem, max_num_stages: int | None) -> _Tables:
    num_layers, num_devices = problem.num_layers, problem.num_devices
    mesh_ids = np.flatnonzero(np.array(problem.submesh_sizes) <= num_devices)
    sizes = np.array(problem.submesh_sizes, dtype=np.int64)[mesh_ids]
    cost_s = problem.stage_cost_s[:, :, mesh_ids].copy()
    cost_s[np.tril_indices(num_layers, -1)] = np.inf
    if problem.max_n_succ_stages is None:
        raw = np.full(cost_s.shape, np.inf)
    else:
        raw = problem.max_n_succ_stages[:, :, mesh_ids]
    cost_s[raw < 0] = np.inf
    # After a stage ending at layer i on n_j devices, at most min(L - 1 - i, D - n_j) stages
    # can follow, so a limit at least that large never binds.
    most_after = np.minimum(num_layers - 1 - np.arange(num_layers)[:, None], num_devices - sizes)
    binds = (raw < most_after[None, :, :]) & (raw >= 0)
    finite = np.where(binds, np.floor(raw), -1.0)
    top = max_num_stages if max_num_stages is not None else -1
    if top >= min(num_layers, num_devices):
        top = -1  # no plan has more than min(L, D) stages
    num_finite = int(max(finite.max(initial=-1.0), top)) + 1
    limit = np.where(binds, finite, np.where(raw >= 0, num_finite, 0)).astype(np.int64)
    return _Tables(
        cost_s=cost_s,
        mesh_ids=mesh_ids,
        sizes=sizes,
        limit=limit,
        num_finite=num_finite,
        top=num_finite if top < 0 else top,
    )


def _solve_threshold(tables: _Tables, num_devices: int, t_max_s: float) -> list[Stage] | None:
    """A plan of least ``sum_p t_p`` with every ``t_p <= t_max_s``, or None if there is none.

    ``values[k, a, d] = G(k, d, a)``. The allowance after a stage with limit index ``m`` is
    ``min(a - 1, m)``; since ``G`` does not increase with ``a``, ``G(., ., min(a - 1, m))`` equals
    ``max(G(., ., a - 1), G(., ., m))``, which is computed as a broadcast instead of a gather.
    """
    cost_s = np.where(tables.cost_s <= t_max_s, tables.cost_s, np.inf)
    num_layers, num_finite = cost_s.shape[0], tables.num_finite
    values = np.full((num_layers + 1, num_finite + 1, num_devices + 1), np.inf)
    values[num_layers, :, 0] = 0.0
    if num_finite == 0:
        _fill_unlimited(tables, cost_s, values, num_devices)
    else:
        _fill_limited(tables, cost_s, values, num_devices)
    if not math.isfinite(values[0, tables.top, num_devices]):
        return None
    return _decode(tables, cost_s, values, num_devices)


def _fill_unlimited(tables: _Tables, cost_s: np.ndarray, values: np.ndarray,
                    num_devices: int) -> None:
    """`_solve_threshold`'s table without memory or stage-count limits: what follows a
    stage does not depend on its submesh, only on its size, so the submeshes of one size
    are reduced to their cheapest first (one pass per layer and size, not per submesh)."""
    num_layers = cost_s.shape[0]
    sizes = np.unique(tables.sizes)
    cheapest = np.stack([cost_s[:, :, tables.sizes == size].min(axis=2) for size in sizes],
                        axis=2)  # [first, last, size]
    finite = np.isfinite(cheapest)
    for k in range(num_layers - 1, -1, -1):
        for i in np.flatnonzero(finite[k].any(axis=0)):
            size, ends = sizes[i], np.flatnonzero(finite[k, :, i])
            first, last = ends[0], ends[-1]
            after = values[first + 1 : last + 2, 0, : num_devices + 1 - size]
            best = np.min(after + cheapest[k, first : last + 1, i, None], axis=0)
            np.minimum(values[k, 0, size:], best, out=values[k, 0, size:])


def _fill_limited(tables: _Tables, cost_s: np.ndarray, values: np.ndarray,
                  num_devices: int) -> None:
    """`_solve_threshold`'s table with allowance limits, submesh by submesh."""
    num_layers, num_finite = cost_s.shape[0], tables.num_finite
    finite_cost = np.isfinite(cost_s)
    has_stage = finite_cost.any(axis=1)  # [k, j]
    firsts = np.argmax(finite_cost, axis=1)
    lasts = num_layers - 1 - np.argmax(finite_cost[:, ::-1], axis=1)
    for k in range(num_layers - 1, -1, -1):
        for j in np.flatnonzero(has_stage[k]):
            size, first, last = tables.sizes[j], firsts[k, j], lasts[k, j]
            stage_s = cost_s[k, first : last + 1, j]
            after = values[first + 1 : last + 2, :, : num_devices + 1 - size]
            at_limit = after[np.arange(last - first + 1), tables.limit[k, first : last + 1, j]]
            best = np.min(at_limit + stage_s[:, None], axis=0)
            np.minimum(values[k, num_finite, size:], best, out=values[k, num_finite, size:])
            if num_finite >= 2:
                candidates = np.maximum(after[:, : num_finite - 1], at_limit[:, None, :])
                candidates += stage_s[:, None, None]
                target = values[k, 1:num_finite, size:]
                np.minimum(target, candidates.min(axis=0), out=target)


def _decode(
    tables: _Tables, cost_s: np.ndarray, values: np.ndarray, num_devices: int
) -> list[Stage]:
    """Walks from ``(k, a, d) = (0, top, D)``, re-deriving each stage as the argmin of ``G``."""
    num_layers = cost_s.shape[0]
    usable = tables.sizes[None, :] <= np.arange(num_devices + 1)[:, None]  # [d, j]
    stages: list[Stage] = []
    k, allowance, devices_left = 0, tables.top, num_devices
    while k < num_layers:
        after = allowance if allowance == tables.num_finite else allowance - 1
        next_allowance = np.minimum(after, tables.limit[k])  # (L, S')
        remaining = np.maximum(devices_left - tables.sizes, 0)  # (S',)
        ends = np.arange(num_layers)[:, None]
        candidates = cost_s[k] + values[ends + 1, next_allowance, remaining[None, :]]
        candidates[:, ~usable[devices_left]] = np.inf
        if after < 0:
            candidates[:] = np.inf
        end, mesh = np.unravel_index(int(np.argmin(candidates)), candidates.shape)
        assert math.isfinite(candidates[end, mesh]), f"no stage decodes at layer {k}"
        stages.append((k, int(end), int(tables.mesh_ids[mesh])))
        allowance = int(next_allowance[end, mesh])
        devices_left -= int(tables.sizes[mesh])
        k = int(end) + 1
    assert devices_left == 0, f"decoded plan leaves {devices_left} devices unused"
    return stages


# --- branch and bound over t_max -------------------------------------------------------------


def _plan_within(
    problem: StageProblem,
    tables: _Tables,
    relaxed: _Tables | None,
    t_max_s: float,
    max_num_stages: int | None,
) -> list[Stage] | None:
    """A plan reaching ``F(t_max_s)``, or None; `relaxed` are `tables` without limits, if any.

    The relaxed DP is much cheaper (no allowance dimension) and its plan is optimal for the
    limited problem too whenever it happens to respect the limits, which is the common case.
    """
    if relaxed is None:
        return _solve_threshold(tables, problem.num_devices, t_max_s)
    stages = _solve_threshold(relaxed, problem.num_devices, t_max_s)
    if stages is None or _fits(problem, stages, max_num_stages):
        return stages
    return _solve_threshold(tables, problem.num_devices, t_max_s)


def _search_thresholds(
    problem: StageProblem,
    tables: _Tables,
    thresholds_s: np.ndarray,
    *,
    max_num_stages: int | None,
    optimality_gap: float,
) -> list[Stage] | None:
    """Best plan over all ``t_max`` in `thresholds_s` (sorted), by branch and bound.

    A heap holds open intervals ``(a, b)`` of threshold indices: every index strictly between
    them is untried, ``F(thresholds_s[b])`` is known (``a = -1`` means no lower end). The bound
    of an interval is ``max(F_b + (B - 1) t_{a+1}, B t_{a+1})`` (module docstring).
    """
    pace = problem.num_micro_batches - 1
    relaxed = tables.relaxed() if tables.num_finite else None

    def solve(index: int) -> tuple[float, list[Stage] | None, int]:
        stages = _plan_within(problem, tables, relaxed, float(thresholds_s[index]), max_num_stages)
        if stages is None:
            return math.inf, None, index
        times_s = [float(problem.stage_cost_s[stage]) for stage in stages]
        return math.fsum(times_s), stages, int(np.searchsorted(thresholds_s, max(times_s)))

    def push(low: int, high: int, total_high_s: float) -> None:
        if high - low >= 2 and math.isfinite(total_high_s):
            next_s = float(thresholds_s[low + 1])
            bound_s = max(total_high_s + pace * next_s, (pace + 1) * next_s)
            heapq.heappush(heap, (bound_s, low, high, total_high_s))

    heap: list[tuple[float, int, int, float]] = []
    total_s, best_stages, settled = solve(len(thresholds_s) - 1)
    if best_stages is None:
        return None
    best_s = _latency_s(problem, best_stages)
    push(-1, settled, total_s)
    while heap:
        bound_s, low, high, total_high_s = heapq.heappop(heap)
        if bound_s * (1.0 + optimality_gap) >= best_s:
            break
        middle = (low + high) // 2
        total_s, stages, settled = solve(middle)
        if stages is not None:
            latency_s = _latency_s(problem, stages)
            if latency_s < best_s:
                best_s, best_stages = latency_s, stages
            push(low, settled, total_s)
        push(middle, high, total_high_s)
    return best_stages
