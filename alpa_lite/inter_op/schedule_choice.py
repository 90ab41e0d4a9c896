"""Choosing the pipeline schedule, a phase after the stages are chosen (`inter_op.driver`,
`alpa_lite.simulate`).

Input: the stage assignment (layers -> stages -> submeshes, contiguous), each layer's price on
its stage's mesh, the micro-batch count and the memory budget. Output: `ScheduleChoice`: the
schedule, the model chunks per stage, the layer -> stage map it runs (interleaved: ``n v``
chunks of consecutive layers, chunk ``c`` on stage ``c % n``), its `PipelinePrice`, and the
runner-up.

With ``schedule="auto"`` the candidates are 1F1B, ZB-H1 and, when every stage has the same
mesh and flags, the micro-batch count is a multiple of the stages and there are enough
layers, interleaved 1F1B with 2 and 4 chunks per stage; each is priced by
`pricing.price_pipeline` (its bubble on a timeline, its activations in flight, its extra
transfers and launches) and the fastest that fits the budget wins. GPipe is never faster
than 1F1B and holds more, so it is run only when asked for. The stage DP prices 1F1B (or
GPipe); choosing the schedule after it is a search around the DP, not inside it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from alpa_lite.errors import InvalidConfigError
from alpa_lite.inter_op import pricing
from alpa_lite.inter_op.assignment import StageAssignment
from alpa_lite.pipeline_model.schedules import DEFAULT_VIRTUAL_STAGES

AUTO_VIRTUAL_STAGES = (2, 4)


@dataclasses.dataclass(frozen=True)
class ScheduleChoice:
    """The schedule a pipeline runs.

    Attributes:
        schedule: ``"1f1b"``, ``"gpipe"``, ``"interleaved-1f1b"`` or ``"zb-h1"``.
        virtual_stages: model chunks per stage (1 unless interleaved).
        layer_to_stage: the stage of every layer as run (interleaved: not contiguous).
        price: the pipeline's `pricing.PipelinePrice` under this schedule.
        fits: whether every stage fits the memory budget.
        runner_up: the next best candidate, ``(schedule, virtual stages, step seconds,
            fits the budget)``.
    """

    schedule: str
    virtual_stages: int
    layer_to_stage: tuple[int, ...]
    price: pricing.PipelinePrice
    fits: bool
    runner_up: tuple[str, int, float, bool] | None = None


def interleaved_layers(costs: Sequence[float], num_stages: int, virtual_stages: int
                       ) -> tuple[int, ...]:
    """Layers cut into ``num_stages * virtual_stages`` runs of consecutive layers of about
    equal cost; run ``c`` goes to stage ``c % num_stages``.

    Example:
        >>> interleaved_layers([1.0] * 8, 2, 2)
        (0, 0, 1, 1, 0, 0, 1, 1)
    """
    chunks, num_layers = num_stages * virtual_stages, len(costs)
    prefix = np.cumsum(np.asarray(costs, dtype=float))
    ends, previous = [], 0
    for c in range(1, chunks):
        end = int(np.searchsorted(prefix, prefix[-1] * c / chunks - 1e-12 * prefix[-1])) + 1
        end = min(max(end, previous + 1), num_layers - (chunks - c))
        ends.append(end)
        previous = end
    chunk_of = np.searchsorted(np.asarray(ends), np.arange(num_layers), side="right")
    return tuple(int(c % num_stages) for c in chunk_of)


def candidates(requested: str, virtual_stages: int | None, assignment: StageAssignment,
               k: int) -> list[tuple[str, int]]:
    """The (schedule, chunks per stage) pairs to price for ``requested``."""
    n, num_layers = assignment.num_stages, len(assignment.layer_to_stage)
    if requested != "auto":
        v = (virtual_stages or DEFAULT_VIRTUAL_STAGES) if requested == "interleaved-1f1b" else 1
        if v > 1:
            _check_interleavable(assignment, v, k)
        return [(requested, v)]
    if n == 1:
        return [("1f1b", 1)]
    found = [("1f1b", 1), ("zb-h1", 1)]
    tried = (virtual_stages,) if virtual_stages and virtual_stages > 1 else AUTO_VIRTUAL_STAGES
    if k % n == 0 and _uniform(assignment):
        found += [("interleaved-1f1b", v) for v in tried if num_layers >= n * v]
    return found


def choose_schedule(requested: str, virtual_stages: int | None, assignment: StageAssignment,
                    price_of: Callable[[int, int], pricing.LayerPrice], meshes, link,
                    k: int, budget: float | None, stage_hosts=None) -> ScheduleChoice:
    """Prices every candidate of ``requested`` (`candidates`) and returns the fastest that
    fits ``budget``; when none fits, the fastest, with ``fits`` False. ``price_of(stage,
    layer)`` is the layer's price on the stage's mesh."""
    n = assignment.num_stages
    priced = []
    for schedule, v in candidates(requested, virtual_stages, assignment, k):
        layer_to_stage = assignment.layer_to_stage
        if v > 1:
            layer_to_stage = interleaved_layers(
                [price_of(0, layer).micro_batch_s for layer in range(len(layer_to_stage))], n, v)
        spans = [[price_of(s, layer) for layer, st in enumerate(layer_to_stage) if st == s]
                 for s in range(n)]
        price = pricing.price_pipeline(spans, meshes, link, k, schedule, stage_hosts, v,
                                       assignment.remat)
        fits = budget is None or max(st.memory_bytes for st in price.stages) <= budget
        priced.append(ScheduleChoice(schedule, v, tuple(layer_to_stage), price, fits))
    priced.sort(key=lambda c: (not c.fits, c.price.step_time_s))
    best = priced[0]
    runner_up = None if len(priced) == 1 else (
        priced[1].schedule, priced[1].virtual_stages, priced[1].price.step_time_s,
        priced[1].fits)
    return dataclasses.replace(best, runner_up=runner_up)


def _uniform(assignment: StageAssignment) -> bool:
    """Every stage on the same submesh and view, with the same remat and lean flags (so the
    layers can move between stages when they are interleaved)."""
    rows = set(zip(assignment.submesh_shapes, assignment.logical_shapes,
                   assignment.remat or [None] * assignment.num_stages,
                   assignment.lean or [None] * assignment.num_stages))
    return len(rows) == 1


def _check_interleavable(assignment: StageAssignment, v: int, k: int) -> None:
    n, num_layers = assignment.num_stages, len(assignment.layer_to_stage)
    if num_layers < n * v:
        raise InvalidConfigError(
            f"schedule='interleaved-1f1b' with {v} chunks per stage needs at least {n * v} "
            f"layers for {n} stages; the step has {num_layers}. Use more layers "
            "(AutoLayerOption(layer_num=...)), fewer virtual_stages, or schedule='1f1b'.")
    if k % n:
        raise InvalidConfigError(
            f"schedule='interleaved-1f1b' needs the number of micro-batches to be a multiple "
            f"of the {n} stages; got {k}. Use {n * max(1, round(k / n))} micro-batches, or "
            "schedule='1f1b'.")
    if not _uniform(assignment):
        raise InvalidConfigError(
            "schedule='interleaved-1f1b' moves layers between stages, so every stage needs "
            "the same submesh, logical mesh and remat choice; the stages chosen have "
            f"submeshes {list(assignment.submesh_shapes)} and logical meshes "
            f"{list(assignment.logical_shapes)}. Use stage_option='uniform', or "
            "schedule='auto' (which interleaves only where it can).")
