"""Pipeline timelines: when each stage runs which micro-batch, as data and as a PNG.

Input: a `PipelineSchedule` and per-stage forward/backward (and apply) durations — predicted
(from the plan) or measured (`PipelineExecutable.time_programs`). Output: `TimelineEvent`s
from simulating the schedule (a task starts when its dependencies and its mesh's previous
task are done), and a stages x time chart.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from alpa_lite.pipeline_model.schedules import PipelineSchedule, TaskKind, build_schedule


@dataclasses.dataclass(frozen=True)
class TimelineEvent:
    stage: int
    kind: str
    micro_batch: int
    start_s: float
    end_s: float


def simulate_timeline(schedule: PipelineSchedule, forward_s: Sequence[float],
                      backward_s: Sequence[float],
                      apply_s: Sequence[float] | None = None,
                      weight_s: Sequence[float] | None = None) -> list[TimelineEvent]:
    """Start and end of every task, in dispatch order.

    Durations are per model chunk in model order (per stage unless interleaved); under
    ZB-H1 ``backward_s`` is the input-gradient part and ``weight_s`` the weight-gradient
    part. ``apply_s`` is per stage.

    Example:
        >>> from alpa_lite.pipeline_model.schedules import build_schedule
        >>> events = simulate_timeline(build_schedule("gpipe", 2, 2), [1, 1], [2, 2])
        >>> max(e.end_s for e in events)
        9.0
    """
    n, chunks = schedule.num_stages, schedule.num_chunks
    durations = {TaskKind.FORWARD: forward_s, TaskKind.BACKWARD: backward_s,
                 TaskKind.WEIGHT: weight_s or [0.0] * chunks}
    apply_s = apply_s or [0.0] * n
    mesh_free = [0.0] * n
    done: dict[tuple[TaskKind, int, int], float] = {}
    backward_end = 0.0
    events = []
    for task in schedule.dispatch_order():
        s, b, p = task.stage, task.micro_batch, task.position(n)
        if task.kind is TaskKind.APPLY:
            ready, duration = backward_end, apply_s[s]
        else:
            ready = max((done[key] for key in task.dependencies(n, chunks)), default=0.0)
            duration = durations[task.kind][p]
        start = max(ready, mesh_free[s])
        end = start + duration
        mesh_free[s] = end
        done[(task.kind, p, b)] = end
        if task.kind is not TaskKind.FORWARD and task.kind is not TaskKind.APPLY:
            backward_end = max(backward_end, end)
        events.append(TimelineEvent(s, task.kind.value, b, start, end))
    return events


def plot_timeline(events: Sequence[TimelineEvent], path: str, *, title: str = "") -> str:
    """Writes a stages x time chart (forward blue, backward orange, weight gradient red,
    apply green) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"forward": "#4c72b0", "backward": "#dd8452", "weight": "#c44e52",
              "apply": "#55a868"}
    num_stages = max(e.stage for e in events) + 1
    fig, ax = plt.subplots(figsize=(10, 0.6 * num_stages + 1.2))
    for e in events:
        ax.barh(e.stage, e.end_s - e.start_s, left=e.start_s, color=colors[e.kind],
                edgecolor="white", height=0.8)
        if e.kind != "apply" and e.end_s - e.start_s > 0:
            ax.text((e.start_s + e.end_s) / 2, e.stage, str(e.micro_batch), ha="center",
                    va="center", fontsize=7, color="white")
    ax.set_yticks(range(num_stages))
    ax.set_yticklabels([f"stage {s}" for s in range(num_stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s)")
    ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, colors.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plan_timeline(plan, schedule: PipelineSchedule) -> list[TimelineEvent]:
    """The timeline a pipelined `ParallelPlan` predicts: each stage's forward and backward
    times; interleaved or under ZB-H1, its time shared among its chunks and tasks as
    `pricing.task_durations` does."""
    from alpa_lite.inter_op.pricing import task_durations

    if schedule.virtual_stages == 1 and not schedule.splits_backward:
        return simulate_timeline(schedule, [s.forward_s for s in plan.stages],
                                 [s.backward_s for s in plan.stages])
    forward, backward, weight = task_durations(
        [s.forward_s + s.backward_s for s in plan.stages], schedule,
        [s.remat for s in plan.stages])
    return simulate_timeline(schedule, forward, backward, weight_s=weight)


def write_plan_timeline(plan, path: str) -> str:
    """PNG of the timeline a pipelined plan predicts (from its per-stage times)."""
    schedule = build_schedule(plan.extra.schedule, len(plan.stages), plan.num_micro_batches,
                              getattr(plan.extra, "virtual_stages", 1))
    title = (f"predicted: {plan.extra.schedule}, {len(plan.stages)} stages x "
             f"{plan.num_micro_batches} micro-batches")
    return plot_timeline(plan_timeline(plan, schedule), path, title=title)


def write_measured_timeline(executable, args, path: str, repeats: int = 3) -> str:
    """PNG of the timeline from measured program times of a `PipelineExecutable`."""
    times = executable.time_programs(*args, repeats=repeats)
    n, chunks = len(executable.meshes), executable.schedule.num_chunks
    forward, backward, weight = ([times.get(f"{kind}[{c}]", 0.0) for c in range(chunks)]
                                 for kind in ("forward", "backward", "weight"))
    title = (f"measured: {executable.schedule.kind.value}, {n} stages x {executable.k} "
             "micro-batches")
    events = simulate_timeline(executable.schedule, forward, backward, weight_s=weight)
    return plot_timeline(events, path, title=title)
