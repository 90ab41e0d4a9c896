"""Pipeline schedules as data: which (stage, micro-batch) task runs in which clock.

Input: a schedule kind, the number of pipeline stages ``n`` (one device mesh each) and of
micro-batches ``m``. Output: a `PipelineSchedule`, a tuple of clocks. Each clock holds the tasks
that may run at the same time, at most one per stage; a task only depends on tasks of earlier
clocks. Both schedules take ``2 (n + m - 1)`` compute clocks and then one clock in which every
stage applies its accumulated gradients (Alpa, OSDI'22, section 5; GPipe; PipeDream-flush).

With 0-based stage ``i`` and micro-batch ``b``, the forward (``f``) and backward (``g``) clocks are

* GPipe: ``f(i, b) = i + b`` and ``g(i, b) = (n + m - 1) + (n - 1 - i) + b``: all forwards,
  then all backwards in reverse stage order. Every stage holds all ``m`` micro-batches.
* 1F1B: ``f(i, b) = i + b`` for the first ``n - i`` micro-batches (warm-up), ``f(i, b) = i + 2b``
  afterwards, and ``g(i, b) = 2n - 1 - i + 2b``. After the warm-up, stage ``i`` alternates one
  backward and one forward, so it never holds more than ``n - i`` micro-batches.

The module is pure Python: emit/ runs a schedule, tests check it as data.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
from typing import Any

from alpa_lite.errors import InvalidConfigError


class ScheduleKind(enum.Enum):
    """The pipeline schedules alpa_lite can build."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"


class TaskKind(enum.Enum):
    """What a task does on its stage's mesh."""

    FORWARD = "forward"
    BACKWARD = "backward"
    APPLY = "apply"


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """One unit of work on one stage's mesh.

    Attributes:
        kind: forward, backward (both on one micro-batch) or apply (the gradients of all
            micro-batches, once per step).
        stage: 0-based pipeline stage, which is also the index of the stage's device mesh.
        micro_batch: 0-based micro-batch index; -1 for `TaskKind.APPLY`.
    """

    kind: TaskKind
    stage: int
    micro_batch: int

    def pipeline_stage_id(self, num_stages: int) -> int:
        """Alpa's computation index: forward ``i``, backward ``2n - 1 - i``, apply ``2n + i``.

        Args:
            num_stages: the number ``n`` of pipeline stages.

        Returns:
            The index of this task's computation when the forward and backward passes are cut
            into ``2n`` pipeline stages (mesh ``i`` runs forward ``i`` and backward ``2n - 1 - i``).

        Example:
            >>> Task(TaskKind.BACKWARD, stage=0, micro_batch=3).pipeline_stage_id(4)
            7
        """
        if self.kind is TaskKind.FORWARD:
            return self.stage
        if self.kind is TaskKind.BACKWARD:
            return 2 * num_stages - 1 - self.stage
        return 2 * num_stages + self.stage

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, e.g. ``{"kind": "forward", "stage": 0, "micro_batch": 2}``."""
        return {"kind": self.kind.value, "stage": self.stage, "micro_batch": self.micro_batch}


@dataclasses.dataclass(frozen=True)
class PipelineSchedule:
    """A pipeline schedule: clocks of tasks that may run concurrently.

    Attributes:
        kind: the schedule that was built.
        num_stages: number of pipeline stages (device meshes), ``n``.
        num_micro_batches: number of micro-batches per step, ``m``.
        clocks: one tuple of tasks per clock, sorted by stage; at most one task per stage per
            clock, and every task depends only on tasks of earlier clocks. The last clock holds
            one `TaskKind.APPLY` task per stage.

    Example:
        >>> schedule = build_schedule("1f1b", num_stages=2, num_micro_batches=2)
        >>> len(schedule.clocks), schedule.max_in_flight(0), schedule.max_in_flight(1)
        (7, 2, 1)
        >>> [(t.kind.value, t.stage, t.micro_batch) for t in schedule.clocks[2]]
        [('backward', 1, 0)]
    """

    kind: ScheduleKind
    num_stages: int
    num_micro_batches: int
    clocks: tuple[tuple[Task, ...], ...]

    def dispatch_order(self) -> list[Task]:
        """All tasks in an order a single-threaded driver may issue them.

        Clocks come in order and, within a clock, tasks are sorted by stage; any order within a
        clock is valid because dependencies only point to earlier clocks.
        """
        return [task for clock in self.clocks for task in clock]

    def tasks_of_stage(self, stage: int) -> list[Task]:
        """The tasks that `stage`'s mesh runs, in clock order."""
        return [task for clock in self.clocks for task in clock if task.stage == stage]

    def max_in_flight(self, stage: int) -> int:
        """Peak number of micro-batches whose forward ran on `stage` but whose backward has not.

        This is how many micro-batches of activations the stage keeps alive at once.
        """
        in_flight = peak = 0
        for task in self.tasks_of_stage(stage):
            if task.kind is TaskKind.FORWARD:
                in_flight += 1
                peak = max(peak, in_flight)
            elif task.kind is TaskKind.BACKWARD:
                in_flight -= 1
        return peak

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `from_dict` inverts it."""
        return {
            "kind": self.kind.value,
            "num_stages": self.num_stages,
            "num_micro_batches": self.num_micro_batches,
            "clocks": [[task.to_dict() for task in clock] for clock in self.clocks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineSchedule:
        """Rebuilds a schedule written by `to_dict`."""
        clocks = tuple(
            tuple(
                Task(TaskKind(task["kind"]), int(task["stage"]), int(task["micro_batch"]))
                for task in clock
            )
            for clock in data["clocks"]
        )
        return cls(
            kind=ScheduleKind(data["kind"]),
            num_stages=int(data["num_stages"]),
            num_micro_batches=int(data["num_micro_batches"]),
            clocks=clocks,
        )


def build_schedule(
    kind: ScheduleKind | str, num_stages: int, num_micro_batches: int
) -> PipelineSchedule:
    """Builds a GPipe or 1F1B schedule (formulas in the module docstring).

    Args:
        kind: `ScheduleKind` or its value, ``"gpipe"`` or ``"1f1b"``.
        num_stages: number of pipeline stages ``n`` (positive).
        num_micro_batches: number of micro-batches ``m`` (positive).

    Returns:
        ``2 (n + m - 1)`` compute clocks followed by one apply clock.

    Raises:
        InvalidConfigError: if `kind` is unknown or a count is not a positive integer.

    Example:
        >>> schedule = build_schedule(ScheduleKind.GPIPE, num_stages=4, num_micro_batches=8)
        >>> len(schedule.clocks), schedule.max_in_flight(0)
        (23, 8)
    """
    kind = _check_kind(kind)
    num_stages = _check_positive_int(num_stages, "num_stages")
    num_micro_batches = _check_positive_int(num_micro_batches, "num_micro_batches")
    n, m = num_stages, num_micro_batches
    num_compute_clocks = 2 * (n + m - 1)
    by_clock: list[list[Task]] = [[] for _ in range(num_compute_clocks)]
    for stage in range(n):
        for micro_batch in range(m):
            forward_clock, backward_clock = _task_clocks(kind, n, m, stage, micro_batch)
            by_clock[forward_clock].append(Task(TaskKind.FORWARD, stage, micro_batch))
            by_clock[backward_clock].append(Task(TaskKind.BACKWARD, stage, micro_batch))
    clocks = [tuple(sorted(clock, key=lambda task: task.stage)) for clock in by_clock]
    clocks.append(tuple(Task(TaskKind.APPLY, stage, -1) for stage in range(n)))
    return PipelineSchedule(kind, n, m, tuple(clocks))


def in_flight_micro_batches(schedule: str, num_stages: int, stage: int, k: int) -> int:
    """Micro-batches whose activations ``stage`` holds at once (what pricing charges memory
    for): 1F1B ``min(S - s, k)``, GPipe all ``k``; equal to
    ``build_schedule(schedule, S, k).max_in_flight(stage)``, without building the schedule."""
    return k if _check_kind(schedule) is ScheduleKind.GPIPE else min(num_stages - stage, k)


def _task_clocks(
    kind: ScheduleKind, n: int, m: int, stage: int, micro_batch: int
) -> tuple[int, int]:
    """The (forward, backward) clocks of one (stage, micro-batch); see the module docstring."""
    if kind is ScheduleKind.GPIPE:
        return stage + micro_batch, (n + m - 1) + (n - 1 - stage) + micro_batch
    warm_up = n - stage
    if micro_batch < warm_up:
        forward_clock = stage + micro_batch
    else:
        forward_clock = stage + 2 * micro_batch
    return forward_clock, 2 * n - 1 - stage + 2 * micro_batch


def _check_kind(kind: ScheduleKind | str) -> ScheduleKind:
    if isinstance(kind, ScheduleKind):
        return kind
    choices = [k.value for k in ScheduleKind]
    if isinstance(kind, str) and kind.strip().lower() in choices:
        return ScheduleKind(kind.strip().lower())
    raise InvalidConfigError(
        f"Expected a pipeline schedule, one of {choices} or a ScheduleKind; got {kind!r}. "
        "Pass schedule='1f1b' (less activation memory) or schedule='gpipe'."
    )


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise InvalidConfigError(
        f"Expected {name} to be a positive integer; got {value!r}. Pass {name}=1 or more."
    )
