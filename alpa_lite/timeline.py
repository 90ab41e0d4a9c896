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
                      apply_s: Sequence[float] | None = None) -> list[TimelineEvent]:
    """Start and end of every task, in dispatch order.

    Example:
        >>> from alpa_lite.pipeline_model.schedules import build_schedule
        >>> events = simulate_timeline(build_schedule("gpipe", 2, 2), [1, 1], [2, 2])
        >>> max(e.end_s for e in events)
        9.0
    """
    n = schedule.num_stages
    apply_s = apply_s or [0.0] * n
    mesh_free = [0.0] * n
    done: dict[tuple[str, int, int], float] = {}
    events = []
    for task in schedule.dispatch_order():
        s, b = task.stage, task.micro_batch
        if task.kind is TaskKind.FORWARD:
            ready = done.get(("forward", s - 1, b), 0.0) if s > 0 else 0.0
            duration = forward_s[s]
        elif task.kind is TaskKind.BACKWARD:
            ready = max(done.get(("forward", s, b), 0.0),
                        done.get(("backward", s + 1, b), 0.0) if s < n - 1 else 0.0)
            duration = backward_s[s]
        else:
            ready = max((t for (kind, _, _), t in done.items() if kind == "backward"), default=0.0)
            duration = apply_s[s]
        start = max(ready, mesh_free[s])
        end = start + duration
        mesh_free[s] = end
        done[(task.kind.value, s, b)] = end
        events.append(TimelineEvent(s, task.kind.value, b, start, end))
    return events


def plot_timeline(events: Sequence[TimelineEvent], path: str, *, title: str = "") -> str:
    """Writes a stages x time chart (forward blue, backward orange, apply green) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"forward": "#4c72b0", "backward": "#dd8452", "apply": "#55a868"}
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
    """The timeline a pipelined `ParallelPlan` predicts."""
    forward = [s.forward_s for s in plan.stages]
    backward = [s.backward_s for s in plan.stages]
    return simulate_timeline(schedule, forward, backward)


def write_plan_timeline(plan, path: str) -> str:
    """PNG of the timeline a pipelined plan predicts (from its per-stage times)."""
    schedule = build_schedule(plan.extra.schedule, len(plan.stages), plan.num_micro_batches)
    title = (f"predicted: {plan.extra.schedule}, {len(plan.stages)} stages x "
             f"{plan.num_micro_batches} micro-batches")
    return plot_timeline(plan_timeline(plan, schedule), path, title=title)


def write_measured_timeline(executable, args, path: str, repeats: int = 3) -> str:
    """PNG of the timeline from measured program times of a `PipelineExecutable`."""
    times = executable.time_programs(*args, repeats=repeats)
    n = len(executable.meshes)
    forward = [times.get(f"forward[{s}]", 0.0) for s in range(n)]
    backward = [times.get(f"backward[{s}]", 0.0) for s in range(n)]
    title = (f"measured: {executable.schedule.kind.value}, {n} stages x {executable.k} "
             "micro-batches")
    events = simulate_timeline(executable.schedule, forward, backward)
    return plot_timeline(events, path, title=title)
