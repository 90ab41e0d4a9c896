"""Pipeline schedules as data: which (stage, micro-batch) task runs in which clock.

Input: a schedule kind, the number of pipeline stages ``n`` (one device mesh each), of
micro-batches ``m`` and, for the interleaved schedule, of model chunks per stage ``v``
(virtual stages). Output: a `PipelineSchedule`, a tuple of clocks. Each clock holds the tasks
that may run at the same time, at most one per stage; a task only depends on tasks of earlier
clocks. The last clock has one task per stage that applies the accumulated gradients (Alpa,
OSDI'22, section 5).

Every schedule is an order of tasks per stage; the clocks are that order run as soon as
possible with every task taking one clock (`_run_in_clocks`). With 0-based stage ``i``:

* GPipe: all ``m`` forwards, then all ``m`` backwards. Every stage holds all ``m``
  micro-batches. ``2 (n + m - 1)`` compute clocks.
* 1F1B (PipeDream-flush): ``n - i`` forwards, then one backward and one forward alternately,
  then the remaining backwards; stage ``i`` never holds more than ``n - i`` micro-batches.
  ``2 (n + m - 1)`` compute clocks.
* Interleaved 1F1B (Megatron-LM, SC'21): the model is cut into ``n v`` chunks and stage ``i``
  holds chunks ``i, i + n, ...`` (``Task.chunk`` ``0 .. v-1``). Forwards go through a stage's
  chunks in rounds of ``n`` micro-batches; ``2 (n - i - 1) + (v - 1) n`` warm-up forwards,
  then one forward and one backward alternately. The fill and drain take ``n - 1`` chunk
  times instead of ``n - 1`` stage times: the bubble shrinks ``v``-fold, for more transfers
  and activations. Needs ``m`` to be a multiple of ``n``.
* ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR'24): each backward is split into
  the input-gradient part (`TaskKind.BACKWARD`, which the previous stage waits for) and the
  weight-gradient part (`TaskKind.WEIGHT`, which nobody waits for). Stage ``i`` runs 1F1B's
  order with each micro-batch's weight gradient after its backward, except that it keeps
  ``i`` weight gradients pending and runs them last, in its drain. Peak activations (held
  until the weight gradient) are ``n`` micro-batches on every stage, 1F1B's first stage's;
  the bubble is ``(n - 1)(F + B - W)`` instead of ``(n - 1)(F + B + W)``.

The module is pure Python: emit/ runs a schedule, tests check it as data.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import numbers
from typing import Any

from alpa_lite.errors import InvalidConfigError


# model chunks per stage of the interleaved schedule when none is given
DEFAULT_VIRTUAL_STAGES = 2


class ScheduleKind(enum.Enum):
    """The pipeline schedules alpa_lite can build."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved-1f1b"
    ZB_H1 = "zb-h1"


class TaskKind(enum.Enum):
    """What a task does on its stage's mesh."""

    FORWARD = "forward"
    BACKWARD = "backward"  # the whole backward, or (ZB-H1) its input-gradient part
    WEIGHT = "weight"      # ZB-H1: the weight-gradient part of a backward
    APPLY = "apply"


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """One unit of work on one stage's mesh.

    Attributes:
        kind: forward, backward, weight gradient (all three on one micro-batch) or apply (the
            gradients of all micro-batches, once per step).
        stage: 0-based pipeline stage, which is also the index of the stage's device mesh.
        micro_batch: 0-based micro-batch index; -1 for `TaskKind.APPLY`.
        chunk: which of the stage's model chunks (0 unless interleaved); the chunk's place in
            the model is `position`.
    """

    kind: TaskKind
    stage: int
    micro_batch: int
    chunk: int = 0

    def position(self, num_stages: int) -> int:
        """The model chunk this task runs, counted along the model: ``chunk * n + stage``."""
        return self.chunk * num_stages + self.stage

    def dependencies(self, num_stages: int, num_chunks: int
                     ) -> list[tuple[TaskKind, int, int]]:
        """The ``(kind, position, micro-batch)`` of the tasks this one waits for: a forward
        for the previous chunk's forward, a backward for its own forward and the next
        chunk's backward, a weight gradient for its backward (apply: none here; it waits
        for every backward)."""
        p, b = self.position(num_stages), self.micro_batch
        if self.kind is TaskKind.FORWARD:
            return [(TaskKind.FORWARD, p - 1, b)] if p > 0 else []
        if self.kind is TaskKind.WEIGHT:
            return [(TaskKind.BACKWARD, p, b)]
        if self.kind is TaskKind.BACKWARD:
            return [(TaskKind.FORWARD, p, b)] + (
                [(TaskKind.BACKWARD, p + 1, b)] if p < num_chunks - 1 else [])
        return []

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
        if self.kind in (TaskKind.BACKWARD, TaskKind.WEIGHT):
            return 2 * num_stages - 1 - self.stage
        return 2 * num_stages + self.stage

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, e.g. ``{"kind": "forward", "stage": 0, "micro_batch": 2}``
        (with ``"chunk"`` when it is not 0)."""
        data = {"kind": self.kind.value, "stage": self.stage, "micro_batch": self.micro_batch}
        if self.chunk:
            data["chunk"] = self.chunk
        return data


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
        virtual_stages: model chunks per stage, ``v`` (1 unless interleaved).

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
    virtual_stages: int = 1

    @property
    def num_chunks(self) -> int:
        """Model chunks in all, ``n v`` (the programs forward[0 .. n v - 1] run them)."""
        return self.num_stages * self.virtual_stages

    @property
    def splits_backward(self) -> bool:
        """Whether backwards run as an input-gradient and a weight-gradient task (ZB-H1)."""
        return self.kind is ScheduleKind.ZB_H1

    def dispatch_order(self) -> list[Task]:
        """All tasks in an order a single-threaded driver may issue them.

        Clocks come in order and, within a clock, tasks are sorted by stage; any order within a
        clock is valid because dependencies only point to earlier clocks.
        """
        return [task for clock in self.clocks for task in clock]

    def tasks_of_stage(self, stage: int) -> list[Task]:
        """The tasks that `stage`'s mesh runs, in clock order."""
        return [task for clock in self.clocks for task in clock if task.stage == stage]

    def max_in_flight(self, stage: int) -> float:
        """Peak number of micro-batches whose activations `stage` keeps at once: a forward
        adds one, the backward that ends it (the weight-gradient part under ZB-H1) removes
        it. A chunk of an interleaved stage counts ``1 / v`` of a micro-batch."""
        last = TaskKind.WEIGHT if self.splits_backward else TaskKind.BACKWARD
        in_flight = peak = 0
        for task in self.tasks_of_stage(stage):
            if task.kind is TaskKind.FORWARD:
                in_flight += 1
                peak = max(peak, in_flight)
            elif task.kind is last:
                in_flight -= 1
        return peak if self.virtual_stages == 1 else peak / self.virtual_stages

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `from_dict` inverts it."""
        return {
            "kind": self.kind.value,
            "num_stages": self.num_stages,
            "num_micro_batches": self.num_micro_batches,
            "virtual_stages": self.virtual_stages,
            "clocks": [[task.to_dict() for task in clock] for clock in self.clocks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineSchedule:
        """Rebuilds a schedule written by `to_dict`."""
        clocks = tuple(
            tuple(
                Task(TaskKind(task["kind"]), int(task["stage"]), int(task["micro_batch"]),
                     int(task.get("chunk", 0)))
                for task in clock
            )
            for clock in data["clocks"]
        )
        return cls(
            kind=ScheduleKind(data["kind"]),
            num_stages=int(data["num_stages"]),
            num_micro_batches=int(data["num_micro_batches"]),
            clocks=clocks,
            virtual_stages=int(data.get("virtual_stages", 1)),
        )


def build_schedule(
    kind: ScheduleKind | str, num_stages: int, num_micro_batches: int,
    virtual_stages: int = 1,
) -> PipelineSchedule:
    """Builds a schedule (orders in the module docstring).

    Args:
        kind: `ScheduleKind` or its value, ``"gpipe"``, ``"1f1b"``, ``"interleaved-1f1b"`` or
            ``"zb-h1"``.
        num_stages: number of pipeline stages ``n`` (positive).
        num_micro_batches: number of micro-batches ``m`` (positive; a multiple of ``n`` for
            the interleaved schedule).
        virtual_stages: model chunks per stage ``v``: 2 or more for the interleaved schedule,
            1 for the others.

    Returns:
        The compute clocks followed by one apply clock.

    Raises:
        InvalidConfigError: if `kind` is unknown, a count is not a positive integer, or the
            counts do not suit the kind.

    Example:
        >>> schedule = build_schedule(ScheduleKind.GPIPE, num_stages=4, num_micro_batches=8)
        >>> len(schedule.clocks), schedule.max_in_flight(0)
        (23, 8)
    """
    kind = _check_kind(kind)
    n = _check_positive_int(num_stages, "num_stages")
    m = _check_positive_int(num_micro_batches, "num_micro_batches")
    v = _check_positive_int(virtual_stages, "virtual_stages")
    _check_counts(kind, n, m, v)
    return _build(kind, n, m, v)


@functools.lru_cache(maxsize=256)
def _build(kind: ScheduleKind, n: int, m: int, v: int) -> PipelineSchedule:
    orders = {ScheduleKind.GPIPE: _gpipe_order, ScheduleKind.ONE_F_ONE_B: _one_f_one_b_order,
              ScheduleKind.INTERLEAVED: _interleaved_order, ScheduleKind.ZB_H1: _zb_h1_order}[kind]
    clocks = _run_in_clocks([orders(n, m, v, stage) for stage in range(n)], n, v)
    clocks.append(tuple(Task(TaskKind.APPLY, stage, -1) for stage in range(n)))
    return PipelineSchedule(kind, n, m, tuple(clocks), v)


def in_flight_micro_batches(schedule: str, num_stages: int, stage: int, k: int,
                            virtual_stages: int = 1) -> float:
    """Micro-batches whose activations ``stage`` holds at once (what pricing charges memory
    for): ``build_schedule(schedule, S, k, v).max_in_flight(stage)``; GPipe all ``k`` and
    1F1B ``min(S - s, k)`` without building the schedule."""
    kind = _check_kind(schedule)
    if kind is ScheduleKind.GPIPE:
        return k
    if kind is ScheduleKind.ONE_F_ONE_B:
        return min(num_stages - stage, k)
    # the count stops growing once the warm-up fits: from 2 S v micro-batches on it is that
    # of 2 S v (checked against every k up to 6 S v for S <= 8, v <= 4 in the tests)
    saturated = 2 * num_stages * virtual_stages
    return build_schedule(kind, num_stages, min(k, saturated),
                          virtual_stages).max_in_flight(stage)


# --- per-stage orders ----------------------------------------------------------------------


def _gpipe_order(n: int, m: int, v: int, stage: int) -> list[Task]:
    return ([Task(TaskKind.FORWARD, stage, b) for b in range(m)]
            + [Task(TaskKind.BACKWARD, stage, b) for b in range(m)])


def _one_f_one_b_order(n: int, m: int, v: int, stage: int) -> list[Task]:
    warm_up = min(n - stage, m)
    order = [Task(TaskKind.FORWARD, stage, b) for b in range(warm_up)]
    for b in range(m):
        order.append(Task(TaskKind.BACKWARD, stage, b))
        if warm_up + b < m:
            order.append(Task(TaskKind.FORWARD, stage, warm_up + b))
    return order


def _interleaved_order(n: int, m: int, v: int, stage: int) -> list[Task]:
    """Megatron-LM's order: the ``k``-th forward of a stage runs chunk ``(k // n) % v`` on
    micro-batch ``(k // (n v)) n + k % n``; backwards go through the chunks in reverse."""
    total = m * v

    def forward(k: int) -> Task:
        return Task(TaskKind.FORWARD, stage, (k // (n * v)) * n + k % n, (k // n) % v)

    def backward(k: int) -> Task:
        return Task(TaskKind.BACKWARD, stage, (k // (n * v)) * n + k % n, v - 1 - (k // n) % v)

    warm_up = total if m == n else min(total, 2 * (n - stage - 1) + (v - 1) * n)
    order = [forward(k) for k in range(warm_up)]
    for k in range(total - warm_up):
        order += [forward(warm_up + k), backward(k)]
    order += [backward(k) for k in range(total - warm_up, total)]
    return order


def _zb_h1_order(n: int, m: int, v: int, stage: int) -> list[Task]:
    """ZB-H1's order (Qi et al., figure 3): 1F1B's ``n - i`` warm-up forwards, then per
    micro-batch ``b`` its backward, the weight gradient of micro-batch ``b - i`` (stage ``i``
    keeps ``i`` of them pending: the later the stage, the longer its drain, which they
    fill) and the next forward; the pending weight gradients last."""
    warm_up = min(n - stage, m)
    order = [Task(TaskKind.FORWARD, stage, b) for b in range(warm_up)]
    for b in range(m):
        order.append(Task(TaskKind.BACKWARD, stage, b))
        if b >= stage:
            order.append(Task(TaskKind.WEIGHT, stage, b - stage))
        if warm_up + b < m:
            order.append(Task(TaskKind.FORWARD, stage, warm_up + b))
    order += [Task(TaskKind.WEIGHT, stage, b) for b in range(max(m - stage, 0), m)]
    return order


def _run_in_clocks(orders: list[list[Task]], n: int, v: int) -> list[tuple[Task, ...]]:
    """Runs each stage's order as soon as possible, every task taking one clock and waiting
    for its `Task.dependencies`."""
    finished: dict[tuple[TaskKind, int, int], int] = {}  # (kind, position, mb) -> clock
    position = [0] * n
    clocks: list[tuple[Task, ...]] = []

    def ready(task: Task, clock: int) -> bool:
        return all(finished.get(key, clock) < clock for key in task.dependencies(n, n * v))

    while any(position[s] < len(orders[s]) for s in range(n)):
        clock = len(clocks)
        tasks = tuple(orders[s][position[s]] for s in range(n)
                      if position[s] < len(orders[s]) and ready(orders[s][position[s]], clock))
        if not tasks:
            raise RuntimeError(f"internal error: the pipeline schedule is stuck at clock {clock}")
        for task in tasks:
            position[task.stage] += 1
            finished[(task.kind, task.position(n), task.micro_batch)] = clock
        clocks.append(tasks)
    return clocks


def _check_counts(kind: ScheduleKind, n: int, m: int, v: int) -> None:
    if kind is ScheduleKind.INTERLEAVED:
        if v < 2:
            raise InvalidConfigError(
                f"The interleaved-1f1b schedule needs virtual_stages >= 2 (model chunks per "
                f"stage); got {v}. Pass virtual_stages=2 or more, or schedule='1f1b'.")
        if m % n:
            raise InvalidConfigError(
                f"The interleaved-1f1b schedule needs the number of micro-batches to be a "
                f"multiple of the {n} stages; got {m}. Use {n * max(1, round(m / n))} "
                "micro-batches, or schedule='1f1b'.")
    elif v != 1:
        raise InvalidConfigError(
            f"virtual_stages={v} needs schedule='interleaved-1f1b'; got schedule="
            f"{kind.value!r}. Pass virtual_stages=1 or schedule='interleaved-1f1b'.")


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
