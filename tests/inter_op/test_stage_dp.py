import dataclasses
import json
import math

import numpy as np
import pytest

from alpa_lite.errors import InfeasiblePlanError, InvalidConfigError
from alpa_lite.inter_op.stage_dp import (
    StageProblem,
    StageSolution,
    enumerate_submesh_shapes,
    solve_stage_brute_force,
    solve_stage_dp,
)

SIZES_1X8 = (1, 2, 4, 8)
# Both solvers sum stage times with math.fsum, so equal plans agree to the bit; 1e-9 only
# allows different plans of equal cost.
RTOL = 1e-9


def _random_problem(
    rng: np.random.Generator,
    num_layers: int,
    num_micro_batches: int,
    *,
    with_limits: bool,
    sizes: tuple[int, ...] = SIZES_1X8,
    num_devices: int = 8,
    inf_fraction: float = 0.2,
) -> StageProblem:
    shape = (num_layers, num_layers, len(sizes))
    cost_s = rng.uniform(0.1, 10.0, shape)
    cost_s[rng.random(shape) < inf_fraction] = np.inf
    limits = None
    if with_limits:
        limits = rng.integers(-1, 4, shape).astype(np.float64)
        limits[rng.random(shape) < 0.3] = np.inf
    return StageProblem(num_layers, num_devices, num_micro_batches, sizes, cost_s, limits)


def _assert_consistent(problem: StageProblem, solution: StageSolution) -> None:
    stages = solution.stages
    assert stages[0][0] == 0 and stages[-1][1] == problem.num_layers - 1
    for (_, end, _), (start, _, _) in zip(stages, stages[1:]):
        assert start == end + 1
    assert sum(problem.submesh_sizes[mesh] for _, _, mesh in stages) == problem.num_devices
    times_s = [problem.stage_cost_s[stage] for stage in stages]
    assert all(math.isfinite(t) for t in times_s)
    if problem.max_n_succ_stages is not None:
        for position, stage in enumerate(stages):
            assert problem.max_n_succ_stages[stage] >= len(stages) - 1 - position
    expected_s = sum(times_s) + (problem.num_micro_batches - 1) * max(times_s)
    assert solution.cost_s == pytest.approx(expected_s, rel=1e-12)
    assert solution.max_stage_cost_s == max(times_s)


def _solve_both(problem: StageProblem, **kwargs):
    """(dp, brute force), each a StageSolution or None when infeasible."""
    results = []
    for solve in (solve_stage_dp, solve_stage_brute_force):
        try:
            results.append(solve(problem, **kwargs))
        except InfeasiblePlanError:
            results.append(None)
    return results


@pytest.mark.parametrize("seed", range(30))
def test_dp_matches_brute_force_on_random_problems(seed):
    rng = np.random.default_rng(seed)
    num_layers = 1 + seed % 8
    num_micro_batches = (1, 4, 16)[seed % 3]
    problem = _random_problem(rng, num_layers, num_micro_batches, with_limits=seed % 2 == 1)
    dp, brute_force = _solve_both(problem)
    assert (dp is None) == (brute_force is None)
    if dp is not None:
        assert dp.cost_s == pytest.approx(brute_force.cost_s, rel=RTOL)
        _assert_consistent(problem, dp)


def test_random_problems_are_mostly_feasible():
    feasible = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        problem = _random_problem(rng, 1 + seed % 8, 4, with_limits=seed % 2 == 1)
        feasible += _solve_both(problem)[1] is not None
    assert feasible >= 20


def _memory_bound_problem(seed: int) -> StageProblem:
    """Deep stages cost superlinearly and hold more activations, so limits bind often."""
    rng = np.random.default_rng(500 + seed)
    num_layers = 4 + seed % 5
    layers = np.maximum(np.arange(num_layers)[None, :] - np.arange(num_layers)[:, None] + 1, 1)
    sizes = np.array(SIZES_1X8, dtype=np.float64)
    shape = (num_layers, num_layers, len(SIZES_1X8))
    cost_s = layers[:, :, None] ** 1.5 / np.sqrt(sizes) * rng.uniform(0.8, 1.2, shape)
    limits = np.floor(rng.uniform(1.0, 4.0, shape) * sizes / layers[:, :, None]) - 1
    num_micro_batches = (1, 4, 16)[seed % 3]
    return StageProblem(num_layers, 8, num_micro_batches, SIZES_1X8, cost_s, limits)


@pytest.mark.parametrize("seed", range(20))
def test_dp_matches_brute_force_when_memory_limits_bind(seed):
    problem = _memory_bound_problem(seed)
    dp, brute_force = _solve_both(problem)
    assert (dp is None) == (brute_force is None)
    if dp is not None:
        assert dp.cost_s == pytest.approx(brute_force.cost_s, rel=RTOL)
        _assert_consistent(problem, dp)


def test_memory_bound_problems_are_changed_by_their_limits():
    binding = 0
    for seed in range(20):
        problem = _memory_bound_problem(seed)
        unlimited = dataclasses.replace(problem, max_n_succ_stages=None)
        try:
            binding += solve_stage_dp(unlimited).cost_s < solve_stage_dp(problem).cost_s
        except InfeasiblePlanError:
            continue
    assert binding >= 10


@pytest.mark.parametrize("max_num_stages", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", range(4))
def test_dp_matches_brute_force_with_a_stage_count_limit(seed, max_num_stages):
    rng = np.random.default_rng(100 + seed)
    problem = _random_problem(rng, 6, 16, with_limits=seed % 2 == 0, inf_fraction=0.1)
    dp, brute_force = _solve_both(problem, max_num_stages=max_num_stages)
    assert (dp is None) == (brute_force is None)
    if dp is not None:
        assert len(dp.stages) <= max_num_stages
        assert dp.cost_s == pytest.approx(brute_force.cost_s, rel=RTOL)
        _assert_consistent(problem, dp)


@pytest.mark.parametrize("seed", range(3))
def test_dp_matches_brute_force_on_two_hosts(seed):
    rng = np.random.default_rng(200 + seed)
    sizes = tuple(hosts * width for hosts, width in enumerate_submesh_shapes(2, 8))
    problem = _random_problem(
        rng, 6, 8, with_limits=seed == 1, sizes=sizes, num_devices=16, inf_fraction=0.1
    )
    dp, brute_force = _solve_both(problem)
    assert (dp is None) == (brute_force is None)
    if dp is not None:
        assert dp.cost_s == pytest.approx(brute_force.cost_s, rel=RTOL)
        _assert_consistent(problem, dp)


@pytest.mark.parametrize("with_limits", [False, True], ids=["no_memory_limit", "memory_limit"])
@pytest.mark.parametrize("seed", range(5))
def test_reference_case_13_eight_layers_one_host_of_eight(seed, with_limits):
    shapes = enumerate_submesh_shapes(1, 8)
    assert shapes == [(1, 1), (1, 2), (1, 4), (1, 8)]
    sizes = tuple(hosts * width for hosts, width in shapes)
    rng = np.random.default_rng(1300 + seed)
    problem = _random_problem(rng, 8, 16, with_limits=with_limits, sizes=sizes, inf_fraction=0.0)
    dp, brute_force = _solve_both(problem)
    assert brute_force is not None
    assert dp.cost_s == pytest.approx(brute_force.cost_s, rel=RTOL)
    _assert_consistent(problem, dp)


def _linear_scaling_problem(num_micro_batches: int, **kwargs) -> StageProblem:
    """8 unit layers; a stage of l layers on n devices takes l / n seconds."""
    layers = np.arange(8)[None, :] - np.arange(8)[:, None] + 1
    cost_s = layers[:, :, None] / np.array(SIZES_1X8, dtype=np.float64)
    cost_s = np.where(layers[:, :, None] >= 1, cost_s, np.inf)
    for (start, end, mesh), value in kwargs.get("overrides", {}).items():
        cost_s[start, end, mesh] = value
    return StageProblem(8, 8, num_micro_batches, SIZES_1X8, cost_s)


def test_linear_scaling_prefers_one_stage_on_all_devices():
    solution = solve_stage_dp(_linear_scaling_problem(16))
    assert solution.stages == ((0, 7, 3),)
    assert solution.cost_s == 16.0


def test_without_the_full_mesh_two_balanced_stages_win():
    problem = _linear_scaling_problem(16, overrides={(0, 7, 3): np.inf})
    solution = solve_stage_dp(problem)
    assert solution.stages == ((0, 3, 2), (4, 7, 2))
    assert solution.cost_s == 17.0
    assert solution.max_stage_cost_s == 1.0


@pytest.mark.parametrize("seed", range(8))
def test_looser_memory_limit_never_increases_cost(seed):
    rng = np.random.default_rng(300 + seed)
    tight = _random_problem(rng, 7, 16, with_limits=True, inf_fraction=0.1)
    costs_s = []
    for extra in (0, 1, 2, 4, np.inf):
        limits = tight.max_n_succ_stages + extra
        problem = StageProblem(7, 8, 16, SIZES_1X8, tight.stage_cost_s, limits)
        try:
            costs_s.append(solve_stage_dp(problem).cost_s)
        except InfeasiblePlanError:
            costs_s.append(math.inf)
    unlimited = StageProblem(7, 8, 16, SIZES_1X8, tight.stage_cost_s)
    costs_s.append(solve_stage_dp(unlimited).cost_s)
    assert costs_s == sorted(costs_s, reverse=True)
    assert costs_s[-2] == costs_s[-1]


@pytest.mark.parametrize("num_layers", [1, 3, 6])
def test_one_device_one_micro_batch_costs_the_sum_of_layer_costs(num_layers):
    layer_s = np.random.default_rng(num_layers).uniform(0.5, 2.0, num_layers)
    prefix_s = np.concatenate([[0.0], np.cumsum(layer_s)])
    cost_s = (prefix_s[None, 1:] - prefix_s[:-1, None])[:, :, None]
    problem = StageProblem(num_layers, 1, 1, (1,), np.where(cost_s > 0, cost_s, np.inf))
    solution = solve_stage_dp(problem)
    assert solution.stages == ((0, num_layers - 1, 0),)
    assert solution.cost_s == pytest.approx(layer_s.sum(), rel=1e-12)


def test_one_stage_limit_gives_the_whole_model_on_all_devices():
    problem = _linear_scaling_problem(4, overrides={(0, 7, 3): 5.0})
    assert solve_stage_dp(problem).stages != ((0, 7, 3),)
    assert solve_stage_dp(problem, max_num_stages=1).stages == ((0, 7, 3),)


@pytest.mark.parametrize("gap", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_optimality_gap_bounds_the_excess_cost(seed, gap):
    rng = np.random.default_rng(400 + seed)
    problem = _random_problem(rng, 8, 16, with_limits=seed == 0, inf_fraction=0.0)
    exact = solve_stage_dp(problem)
    approximate = solve_stage_dp(problem, optimality_gap=gap)
    _assert_consistent(problem, approximate)
    assert exact.cost_s <= approximate.cost_s <= (1 + gap) * exact.cost_s * (1 + RTOL)


def test_all_infinite_costs_are_infeasible():
    problem = StageProblem(3, 8, 4, SIZES_1X8, np.full((3, 3, 4), np.inf))
    with pytest.raises(InfeasiblePlanError, match="3 layers on exactly 8 devices") as info:
        solve_stage_dp(problem)
    assert math.isnan(info.value.budget_bytes) and math.isnan(info.value.min_bytes)
    with pytest.raises(InfeasiblePlanError, match="3 layers on exactly 8 devices"):
        solve_stage_brute_force(problem)


def test_submesh_sizes_that_cannot_sum_to_the_devices_are_infeasible():
    problem = StageProblem(2, 8, 4, (3,), np.ones((2, 2, 1)))
    with pytest.raises(InfeasiblePlanError, match=r"submesh sizes \(3,\).*Fix: add submesh"):
        solve_stage_dp(problem)


def test_memory_limits_can_make_every_plan_infeasible():
    cost_s = np.ones((4, 4, 4))
    # Every stage fits only if no stage follows it, but one stage cannot fill 8 devices.
    limits = np.zeros((4, 4, 4))
    limits[:, :, 3] = -1
    problem = StageProblem(4, 8, 4, SIZES_1X8, cost_s, limits)
    with pytest.raises(InfeasiblePlanError, match="the memory limits"):
        solve_stage_dp(problem)
    with pytest.raises(InfeasiblePlanError, match="the memory limits"):
        solve_stage_brute_force(problem)


def test_solution_serialises_to_json():
    solution = solve_stage_dp(_linear_scaling_problem(16, overrides={(0, 7, 3): np.inf}))
    data = json.loads(json.dumps(solution.to_dict()))
    assert data == {"stages": [[0, 3, 2], [4, 7, 2]], "cost_s": 17.0, "max_stage_cost_s": 1.0}


@pytest.mark.parametrize(
    ("num_hosts", "devices_per_host", "expected"),
    [
        (1, 1, [(1, 1)]),
        (1, 8, [(1, 1), (1, 2), (1, 4), (1, 8)]),
        (3, 4, [(1, 1), (1, 2), (1, 4), (2, 4), (3, 4)]),
        (2, 6, [(1, 1), (1, 2), (1, 4), (1, 6), (2, 6)]),
    ],
)
def test_enumerate_submesh_shapes(num_hosts, devices_per_host, expected):
    assert enumerate_submesh_shapes(num_hosts, devices_per_host) == expected


def test_enumerate_submesh_shapes_for_eight_hosts_of_eight():
    sizes = [hosts * width for hosts, width in enumerate_submesh_shapes(8, 8)]
    assert sizes == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


def test_problem_rejects_a_cost_table_of_the_wrong_shape():
    with pytest.raises(InvalidConfigError, match=r"shape .* = \(3, 3, 4\); got \(3, 3, 2\)"):
        StageProblem(3, 8, 4, SIZES_1X8, np.ones((3, 3, 2)))


def test_problem_rejects_nan_and_negative_costs():
    with pytest.raises(InvalidConfigError, match="without NaN; got 1 NaN"):
        StageProblem(1, 1, 1, (1,), np.full((1, 1, 1), np.nan))
    with pytest.raises(InvalidConfigError, match="costs >= 0 seconds; got a minimum of -1.0"):
        StageProblem(1, 1, 1, (1,), np.full((1, 1, 1), -1.0))


@pytest.mark.parametrize("field", ["num_layers", "num_devices", "num_micro_batches"])
def test_problem_rejects_non_positive_counts(field):
    args = {"num_layers": 1, "num_devices": 1, "num_micro_batches": 1, field: 0}
    with pytest.raises(InvalidConfigError, match=f"Expected {field} to be a positive integer"):
        StageProblem(**args, submesh_sizes=(1,), stage_cost_s=np.ones((1, 1, 1)))


def test_problem_rejects_empty_or_non_positive_submesh_sizes():
    with pytest.raises(InvalidConfigError, match="at least one submesh size"):
        StageProblem(1, 1, 1, (), np.ones((1, 1, 0)))
    with pytest.raises(InvalidConfigError, match="every submesh size to be a positive integer"):
        StageProblem(1, 1, 1, (0,), np.ones((1, 1, 1)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_num_stages": 0}, "max_num_stages to be a positive integer"),
        ({"optimality_gap": -0.1}, "optimality_gap >= 0"),
        ({"optimality_gap": math.inf}, "optimality_gap >= 0"),
    ],
)
def test_solver_rejects_invalid_options(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        solve_stage_dp(_linear_scaling_problem(1), **kwargs)
