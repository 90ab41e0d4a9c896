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
@pytest.mark.parametrize("kind", [ScheduleKind.GPIPE, ScheduleKind.ONE_F_ONE_B],
                         ids=lambda kind: kind.value)
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
    with pytest.raises(InvalidConfigError,
                       match=r"\['gpipe', '1f1b', 'interleaved-1f1b', 'zb-h1'\].*got 'pipedream'"):
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


@pytest.mark.parametrize("kind,virtual_stages", [("zb-h1", 1), ("interleaved-1f1b", 2),
                                                  ("interleaved-1f1b", 4)])
def test_in_flight_stops_growing_at_twice_the_chunks(kind, virtual_stages):
    # `in_flight_micro_batches` builds at most 2 S v micro-batches of a long schedule
    for stages in range(2, 7):
        for k in range(stages, 6 * stages * virtual_stages + 1, stages):
            schedule = build_schedule(kind, stages, k, virtual_stages)
            assert [schedules.in_flight_micro_batches(kind, stages, s, k, virtual_stages)
                    for s in range(stages)] == [schedule.max_in_flight(s)
                                                for s in range(stages)], (stages, k)


def _check_dependencies(schedule: PipelineSchedule) -> dict:
    """Every (kind, chunk, micro-batch) runs once, at most one task per stage per clock, and
    every dependency in an earlier clock; returns the clock of each task."""
    n, last = schedule.num_stages, schedule.num_chunks - 1
    clock_of = {}
    for clock, tasks in enumerate(schedule.clocks):
        assert len({t.stage for t in tasks}) == len(tasks)
        for t in tasks:
            key = (t.kind, t.position(n), t.micro_batch)
            assert key not in clock_of
            clock_of[key] = clock
    kinds = [TaskKind.FORWARD, TaskKind.BACKWARD] + (
        [TaskKind.WEIGHT] if schedule.splits_backward else [])
    assert set(clock_of) == {(k, p, b) for k in kinds for p in range(last + 1)
                             for b in range(schedule.num_micro_batches)} | {
        (TaskKind.APPLY, s, -1) for s in range(n)}
    for (kind, p, b), clock in clock_of.items():
        if kind is TaskKind.FORWARD and p > 0:
            assert clock_of[(TaskKind.FORWARD, p - 1, b)] < clock
        if kind is TaskKind.BACKWARD:
            assert clock_of[(TaskKind.FORWARD, p, b)] < clock
            if p < last:
                assert clock_of[(TaskKind.BACKWARD, p + 1, b)] < clock
        if kind is TaskKind.WEIGHT:
            assert clock_of[(TaskKind.BACKWARD, p, b)] < clock
    return clock_of


@pytest.mark.parametrize("num_micro_batches", NUM_MICRO_BATCHES)
@pytest.mark.parametrize("num_stages", NUM_STAGES[:5])
def test_zb_h1_runs_every_task_in_order_within_1f1b_peak_memory(num_stages, num_micro_batches):
    n, m = num_stages, num_micro_batches
    schedule = build_schedule("zb-h1", n, m)
    _check_dependencies(schedule)
    for stage in range(n):  # held until the weight gradient: never more than 1F1B's first stage
        assert schedule.max_in_flight(stage) <= min(n, m)


@pytest.mark.parametrize("virtual_stages", [2, 3, 4])
@pytest.mark.parametrize("num_stages,num_micro_batches", [(1, 3), (2, 2), (2, 8), (4, 4),
                                                          (4, 8), (4, 16), (8, 16)])
def test_interleaved_runs_every_chunk_in_order(num_stages, num_micro_batches, virtual_stages):
    schedule = build_schedule("interleaved-1f1b", num_stages, num_micro_batches, virtual_stages)
    assert schedule.num_chunks == num_stages * virtual_stages
    _check_dependencies(schedule)
    assert {t.chunk for t in schedule.dispatch_order()} == set(range(virtual_stages))


def test_bubbles_on_a_timeline_shrink_as_the_papers_say():
    """Four equal stages, 8 micro-batches, forward : input gradient : weight gradient =
    1 : 1 : 1 (a stage's micro-batch takes 3): 1F1B idles (n - 1) x 3 = 9 per stage;
    interleaving 2 chunks halves the fill and drain; ZB-H1 fills part of it with weight
    gradients, down to the paper's (n - 1)(F + B - W) = 3."""
    from alpa_lite.timeline import simulate_timeline

    def makespan(kind, v=1):
        schedule = build_schedule(kind, 4, 8, v)
        chunks = 4 * v
        if schedule.splits_backward:
            events = simulate_timeline(schedule, [1 / v] * chunks, [1 / v] * chunks,
                                       weight_s=[1 / v] * chunks)
        else:
            events = simulate_timeline(schedule, [1 / v] * chunks, [2 / v] * chunks)
        return max(e.end_s for e in events)

    work = 8 * 3
    assert makespan("1f1b") == work + 9
    assert makespan("gpipe") == work + 9
    assert makespan("interleaved-1f1b", 2) == pytest.approx(work + 4.5)
    assert makespan("zb-h1") == pytest.approx(work + 3)


def test_interleaved_and_zb_h1_reject_counts_that_do_not_fit():
    with pytest.raises(InvalidConfigError, match="multiple of the 4 stages"):
        build_schedule("interleaved-1f1b", 4, 6, 2)
    with pytest.raises(InvalidConfigError, match="virtual_stages >= 2"):
        build_schedule("interleaved-1f1b", 4, 8, 1)
    with pytest.raises(InvalidConfigError, match="needs schedule='interleaved-1f1b'"):
        build_schedule("zb-h1", 4, 8, 2)


def test_zb_h1_and_interleaved_round_trip_through_json():
    for schedule in (build_schedule("zb-h1", 3, 5), build_schedule("interleaved-1f1b", 2, 4, 2)):
        data = json.loads(json.dumps(schedule.to_dict()))
        assert PipelineSchedule.from_dict(data) == schedule


def test_zb_h1_matches_the_papers_order_for_four_stages():
    """Qi et al.'s ZB-H1 figure: the first stage runs each weight gradient right after its
    backward; the last keeps three pending and runs them in its drain."""
    schedule = build_schedule("zb-h1", 4, 8)

    def text(stage):
        return " ".join(f"{t.kind.value[0].upper()}{t.micro_batch + 1}"
                        for t in schedule.tasks_of_stage(stage) if t.kind is not TaskKind.APPLY)

    assert text(0) == ("F1 F2 F3 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 F8 B5 W5 B6 W6 B7 W7 "
                       "B8 W8")
    assert text(3) == ("F1 B1 F2 B2 F3 B3 F4 B4 W1 F5 B5 W2 F6 B6 W3 F7 B7 W4 F8 B8 W5 W6 "
                       "W7 W8")
