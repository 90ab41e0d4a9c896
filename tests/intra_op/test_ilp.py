"""The sharding ILP against brute force, on random tiny problems (no devices needed)."""

import math

import numpy as np
import pytest

from alpa_lite.errors import InfeasiblePlanError
from alpa_lite.intra_op.ilp import (MemoryTerm, ShardingProblem, memory_profile, min_peak_memory,
                                    solve_brute_force, solve_sharding_problem)


def random_problem(seed: int, *, with_memory: bool) -> ShardingProblem:
    rng = np.random.default_rng(seed)
    num_groups = int(rng.integers(2, 7))
    sizes = [int(rng.integers(2, 6)) for _ in range(num_groups)]
    node_costs = tuple(rng.uniform(0, 10, size=n).round(2) for n in sizes)
    edges = []
    for v in range(1, num_groups):
        for u in rng.choice(v, size=min(v, int(rng.integers(1, 3))), replace=False):
            r = rng.uniform(0, 10, size=(sizes[u], sizes[v])).round(2)
            r[rng.random(r.shape) < 0.3] = 0.0  # many zero (free) reshardings, as in real graphs
            edges.append((int(u), v, r))
    terms, budget = (), None
    if with_memory:
        terms = tuple(
            MemoryTerm(g, rng.uniform(1, 10, size=sizes[g]).round(1), g, min(g + 2, num_groups - 1))
            for g in range(num_groups)
        )
        # A budget between the smallest and the largest peak, so the constraint bites.
        budget = float(sum(t.bytes_per_strategy.mean() for t in terms))
    return ShardingProblem(node_costs, tuple(edges), terms, num_groups, budget)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("with_memory", [False, True])
def test_ilp_matches_brute_force(seed, with_memory):
    problem = random_problem(seed, with_memory=with_memory)
    try:
        expected = solve_brute_force(problem)
    except InfeasiblePlanError:
        with pytest.raises(InfeasiblePlanError, match="memory budget"):
            solve_sharding_problem(problem)
        return
    actual = solve_sharding_problem(problem)
    assert actual.status == "optimal"
    assert actual.objective == pytest.approx(expected.objective, rel=1e-7, abs=1e-7), (
        f"ILP {actual.choices} -> {actual.objective}, brute force {expected.choices} -> "
        f"{expected.objective}")
    if problem.memory_budget_bytes is not None:
        assert memory_profile(problem, actual.choices).max() <= problem.memory_budget_bytes + 1e-6


def test_bigger_budget_never_costs_more():
    problem = random_problem(3, with_memory=True)
    costs = []
    for scale in (1.0, 1.2, 2.0, 100.0):
        scaled = ShardingProblem(problem.node_costs, problem.edges, problem.memory_terms,
                                 problem.num_points, problem.memory_budget_bytes * scale)
        costs.append(solve_sharding_problem(scaled).objective)
    assert all(a >= b - 1e-9 for a, b in zip(costs, costs[1:])), costs


def test_infeasible_budget_reports_budget_and_minimum():
    terms = (MemoryTerm(0, np.array([8.0, 4.0]), 0, 0), MemoryTerm(1, np.array([6.0, 3.0]), 0, 0))
    problem = ShardingProblem((np.zeros(2), np.zeros(2)), (), terms, 1, memory_budget_bytes=5.0)
    with pytest.raises(InfeasiblePlanError) as info:
        solve_sharding_problem(problem)
    assert info.value.budget_bytes == 5.0
    assert info.value.min_bytes == pytest.approx(7.0)
    assert min_peak_memory(problem) == pytest.approx(7.0)
    assert "smallest peak memory" in str(info.value)


def _cbc_available() -> bool:
    import pulp

    from alpa_lite._pulp_compat import bundled_cbc
    return pulp.COIN_CMD(msg=False).available() or bundled_cbc(1.0) is not None


@pytest.mark.skipif(not _cbc_available(),
                    reason="no CBC: PuLP >= 4 bundles none and no `cbc` binary is on PATH")
def test_cbc_backend_agrees_with_highs():
    problem = random_problem(5, with_memory=False)
    highs = solve_sharding_problem(problem, solver="highs")
    cbc = solve_sharding_problem(problem, solver="cbc")
    assert cbc.solver == "cbc" and highs.solver == "highs"
    assert math.isclose(cbc.objective, highs.objective, rel_tol=1e-7, abs_tol=1e-7)
