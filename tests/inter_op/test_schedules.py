import ast
import json
import pathlib

import numpy as np
import pytest

from alpa_lite.errors import InvalidConfigError
from alpa_lite.inter_op import stage_dp
from alpa_lite.pipeline_model import schedules
from alpa_lite.pipeline_model.schedules import (
    PipelineSchedule,
    ScheduleKind,
    Task,
    TaskKind,
    build_schedule,
)

NUM_STAGES = (1, 2, 3, 4, 8, 16, 64)
NUM_MICRO_BATCHES = (1, 2, 3, 4, 8, 17, 128)


def _clock_of(schedule: PipelineSchedule) -> dict[tuple[TaskKind, int, int], int]:
    clock_of = {}
    for clock, tasks in enumerate(schedule.clocks):
        for task in tasks:
            key = (task.kind, task.stage, task.micro_batch)
            assert key not in clock_of, f"{key} runs twice"
            clock_of[key] = clock
    return clock_of


@pytest.mark.parametrize("num_micro_batches", NUM_MICRO_BATCHES)
@pytest.mark.parametrize("num_stages", NUM_STAGES)
@pytest.mark.parametrize("kind", list(ScheduleKind), ids=lambda kind: kind.value)
def test_schedule_invariants(kind, num_stages, num_micro_batches):
    n, m = num_stages, num_micro_batches
    schedule = build_schedule(kind, n, m)
    assert (schedule.kind, schedule.num_stages, schedule.num_micro_batches) == (kind, n, m)
    assert len(schedule.clocks) == 2 * (n + m - 1) + 1
    assert schedule.clocks[-1] == tuple(Task(TaskKind.APPLY, stage, -1) for stage in range(n))
    for clock in schedule.clocks:
        stages = [task.stage for task in clock]
        assert len(stages) == len(set(stages)), f"two tasks on one stage in {clock}"
    clock_of = _clock_of(schedule)
    expected_keys = {
        (kind_, stage, micro_batch)
        for kind_ in (TaskKind.FORWARD, TaskKind.BACKWARD)
        for stage in range(n)
        for micro_batch in range(m)
    } | {(TaskKind.APPLY, stage, -1) for stage in range(n)}
    assert set(clock_of) == expected_keys
    for stage in range(n):
        for b in range(m):
            forward = clock_of[(TaskKind.FORWARD, stage, b)]
            backward = clock_of[(TaskKind.BACKWARD, stage, b)]
            assert forward < backward
            if stage > 0:
                assert clock_of[(TaskKind.FORWARD, stage - 1, b)] < forward
            if stage < n - 1:
                assert clock_of[(TaskKind.BACKWARD, stage + 1, b)] < backward


@pytest.mark.parametrize("num_micro_batches", NUM_MICRO_BATCHES)
@pytest.mark.parametrize("num_stages", NUM_STAGES)
def test_1f1b_keeps_at_most_n_minus_i_micro_batches_in_flight(num_stages, num_micro_batches):
    schedule = build_schedule("1f1b", num_stages, num_micro_batches)
    for stage in range(num_stages):
        assert schedule.max_in_flight(stage) == min(num_stages - stage, num_micro_batches)


@pytest.mark.parametrize("num_micro_batches", NUM_MICRO_BATCHES)
@pytest.mark.parametrize("num_stages", NUM_STAGES)
def test_gpipe_keeps_every_micro_batch_in_flight(num_stages, num_micro_batches):
    schedule = build_schedule("gpipe", num_stages, num_micro_batches)
    for stage in range(num_stages):
        assert schedule.max_in_flight(stage) == num_micro_batches


def test_gpipe_runs_all_forwards_before_any_backward():
    schedule = build_schedule(ScheduleKind.GPIPE, 4, 8)
    kinds = [task.kind for task in schedule.dispatch_order()]
    last_forward = max(i for i, kind in enumerate(kinds) if kind is TaskKind.FORWARD)
    first_backward = kinds.index(TaskKind.BACKWARD)
    assert last_forward < first_backward


def test_1f1b_two_stages_matches_hand_written_clocks():
    schedule = build_schedule("1f1b", 2, 3)
    as_text = [
        " ".join(f"{task.kind.value[0]}{task.stage}.{task.micro_batch}" for task in clock)
        for clock in schedule.clocks
    ]
    assert as_text == [
        "f0.0",
        "f0.1 f1.0",
        "b1.0",
        "b0.0 f1.1",
        "f0.2 b1.1",
        "b0.1 f1.2",
        "b1.2",
        "b0.2",
        "a0.-1 a1.-1",
    ]


def test_dispatch_order_is_clock_order():
    schedule = build_schedule("1f1b", 4, 6)
    order = schedule.dispatch_order()
    assert order == [task for clock in schedule.clocks for task in clock]
    done = set()
    for task in order:
        if task.kind is TaskKind.FORWARD and task.stage > 0:
            assert (TaskKind.FORWARD, task.stage - 1, task.micro_batch) in done
        if task.kind is TaskKind.BACKWARD and task.stage < schedule.num_stages - 1:
            assert (TaskKind.BACKWARD, task.stage + 1, task.micro_batch) in done
        done.add((task.kind, task.stage, task.micro_batch))


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_each_mesh_runs_forward_i_backward_2n_minus_1_minus_i_and_apply(kind):
    n = 4
    schedule = build_schedule(kind, n, 5)
    for stage in range(n):
        ids = {task.pipeline_stage_id(n) for task in schedule.tasks_of_stage(stage)}
        assert ids == {stage, 2 * n - 1 - stage, 2 * n + stage}


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_schedule_round_trips_through_json(kind):
    schedule = build_schedule(kind, 3, 5)
    data = json.loads(json.dumps(schedule.to_dict()))
    assert data["kind"] == kind
    assert data["clocks"][0] == [{"kind": "forward", "stage": 0, "micro_batch": 0}]
    assert PipelineSchedule.from_dict(data) == schedule


def test_build_schedule_accepts_numpy_ints_and_any_case():
    schedule = build_schedule("1F1B", np.int64(2), np.int32(3))
    assert schedule.kind is ScheduleKind.ONE_F_ONE_B
    assert (schedule.num_stages, schedule.num_micro_batches) == (2, 3)


def test_unknown_schedule_kind_lists_the_choices():
    with pytest.raises(InvalidConfigError, match=r"\['gpipe', '1f1b'\].*got 'pipedream'"):
        build_schedule("pipedream", 2, 2)


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
@pytest.mark.parametrize("name", ["num_stages", "num_micro_batches"])
def test_non_positive_int_counts_are_rejected(name, value):
    args = {"num_stages": 2, "num_micro_batches": 2, name: value}
    with pytest.raises(InvalidConfigError, match=f"Expected {name} to be a positive integer"):
        build_schedule("gpipe", **args)


@pytest.mark.parametrize("module", [schedules, stage_dp])
def test_solver_modules_import_only_numpy_stdlib_and_errors(module):
    path = pathlib.Path(module.__file__)
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert not any(name == "jax" or name.startswith("jax.") for name in imported)
    local = {name for name in imported if name.startswith("alpa_lite")}
    assert local <= {"alpa_lite.errors"}, local


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_in_flight_closed_form_equals_the_built_schedule(kind):
    for stages, k in [(1, 1), (2, 4), (4, 2), (4, 8), (3, 3)]:
        schedule = build_schedule(kind, stages, k)
        assert [schedules.in_flight_micro_batches(kind, stages, s, k) for s in range(stages)] \
            == [schedule.max_in_flight(s) for s in range(stages)]
