"""Where a predicted step goes: the time and memory breakdown of `alpa-lite plan --explain`.

A `Breakdown` splits a plan's predicted step time into parts that add up to it, and the
fullest device's memory into parameters, gradients, optimizer state and activations:

* pipelines (1F1B or GPipe over ``S`` stages, ``k`` micro-batches; `inter_op.pricing`):
  ``step = k * t_b + (sum_s t_s - t_b) + once_b`` where ``b`` is the slowest stage. ``k *
  t_b`` is split into the slowest stage's compute by operator class, the recomputed
  forward (rematerialized stages), tensor-parallel (activation) collectives, stage
  transfers and program launches; the pipeline bubble is the schedule's fill and drain
  (``sum_s t_s - t_b`` under 1F1B and GPipe; ``PipelinePrice.bubble_s``); ``once``
  (the stage with the most once-per-step work) is its gradient sync and optimizer update;
* single-mesh plans: ``k`` micro-batches of compute and activation collectives, then the
  gradient sync and optimizer update once.

Gradient sync is exposed: the runtime runs the deferred gradient reductions after the last
micro-batch (`intra_op.once_per_step`), so none of it hides behind the backward pass; the
breakdown says so with an "overlapped" line of 0 rather than leaving it out.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from alpa_lite.cluster import format_bytes


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """A plan's predicted step time and per-device memory, by part.

    Attributes:
        total_s: the predicted step time; ``sum(time)`` equals it.
        time: ``(part, seconds)`` adding up to ``total_s``.
        aside: ``(part, seconds)`` shown but not part of the sum (overlapped work).
        memory: ``(kind, bytes)`` of the fullest device.
        stages: per pipeline stage, ``{"stage", "time_per_micro_batch": [(part, s)],
            "once_per_step": [(part, s)], "memory": [(kind, bytes)]}``.
    """

    total_s: float
    time: tuple[tuple[str, float], ...]
    aside: tuple[tuple[str, float], ...] = ()
    memory: tuple[tuple[str, float], ...] = ()
    stages: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {"total_s": self.total_s, "time": dict(self.time), "aside": dict(self.aside),
                "memory_bytes": dict(self.memory),
                "stages": [{k: dict(v) if isinstance(v, tuple) else v for k, v in st.items()}
                           for st in self.stages]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Breakdown":
        def pairs(table):
            return tuple((str(k), float(v)) for k, v in table.items())

        return cls(float(data["total_s"]), pairs(data["time"]), pairs(data.get("aside", {})),
                   pairs(data.get("memory_bytes", {})),
                   tuple({k: pairs(v) if isinstance(v, dict) else v for k, v in st.items()}
                         for st in data.get("stages", ())))

    def format(self) -> str:
        """Readable lines: each part's seconds and share of the step, then memory."""
        lines = [f"predicted step {self.total_s:.4g} s"]
        for name, seconds in self.time:
            lines.append(f"  {name:<44}{seconds:>10.4g} s {_share(seconds, self.total_s)}")
        for name, seconds in self.aside:
            lines.append(f"  ({name}){'':<{max(0, 42 - len(name))}}{seconds:>10.4g} s")
        if self.memory:
            total = sum(b for _, b in self.memory)
            lines.append(f"memory of the fullest device {format_bytes(total)}")
            for name, num in self.memory:
                lines.append(f"  {name:<44}{format_bytes(num):>12}")
        for st in self.stages:
            parts = ", ".join(f"{n} {s * 1e3:.3g} ms" for n, s in st["time_per_micro_batch"]
                              if s > 0)
            once = ", ".join(f"{n} {s * 1e3:.3g} ms" for n, s in st["once_per_step"] if s > 0)
            memory = ", ".join(f"{n} {format_bytes(b)}" for n, b in st["memory"] if b > 0)
            lines.append(f"stage {st['stage']}: per micro-batch {parts}; once {once}; "
                         f"memory {memory}")
        return "\n".join(lines)


def _share(part: float, total: float) -> str:
    return f"({100 * part / total:5.1f} %)" if total > 0 else ""


def memory_parts(state_bytes: float, activation_bytes: float, state_per_param: float,
                 ) -> tuple[tuple[str, float], ...]:
    """State split into parameters, gradients and optimizer state (``state_per_param``
    bytes of state per parameter byte: 2 + the optimizer's), and activations in flight."""
    params = state_bytes / state_per_param if state_per_param > 0 else 0.0
    return (("parameters", params), ("gradients", params),
            ("optimizer state", max(state_bytes - 2 * params, 0.0)),
            ("activations in flight", activation_bytes))


def _split_compute(by_class: Sequence[tuple[str, float]], recompute_share: float, scale: float
                   ) -> list[tuple[str, float]]:
    """Compute by class times ``scale``, the recomputed forward (``recompute_share`` of it)
    taken out into a part of its own."""
    total = sum(s for _, s in by_class) * scale
    parts = [(f"compute: {name}", s * scale * (1 - recompute_share)) for name, s in by_class]
    return parts + [("recompute (forward again)", total * recompute_share)]


def pipeline_breakdown(price, k: int, *, state_per_param: float,
                       recompute_shares: Sequence[float]) -> Breakdown:
    """The breakdown of a priced pipeline (`inter_op.pricing.PipelinePrice`) run with ``k``
    micro-batches; ``recompute_shares[s]``: the share of stage ``s``'s compute that is the
    recomputed forward (0 without rematerialization). Where stages share a host's compute
    (simulated CPU devices) the step may exceed the overlapped schedule: the excess is a
    part of its own ("stages sharing a host")."""
    stages = price.stages
    slowest = max(range(len(stages)), key=lambda s: stages[s].micro_batch_s)
    once = max(range(len(stages)), key=lambda s: stages[s].grad_sync_s + stages[s].apply_s)
    b = stages[slowest]
    compute = sum(s for _, s in b.compute_by_class)
    time = _split_compute(b.compute_by_class, recompute_shares[slowest], k)
    time += [("activation collectives (tensor parallel)", k * b.comm_s),
             ("stage transfers", k * b.transfer_s),
             ("program launches", k * b.launch_s),
             ("unattributed (per micro-batch)",
              k * (b.micro_batch_s - compute - b.comm_s - b.transfer_s - b.launch_s)),
             ("pipeline bubble", price.bubble_s if price.bubble_s is not None
              else sum(st.micro_batch_s for st in stages) - b.micro_batch_s),
             ("gradient sync (exposed)", stages[once].grad_sync_s),
             ("optimizer update", stages[once].apply_s)]
    overlapped = sum(v for _, v in time)
    time.append(("stages sharing a host", max(price.step_time_s - overlapped, 0.0)))
    per_stage = tuple({
        "stage": s,
        "time_per_micro_batch": tuple(
            _split_compute(st.compute_by_class, recompute_shares[s], 1.0)
            + [("activation collectives (tensor parallel)", st.comm_s),
               ("stage transfers", st.transfer_s), ("program launches", st.launch_s)]),
        "once_per_step": (("gradient sync", st.grad_sync_s), ("optimizer update", st.apply_s)),
        "memory": memory_parts(st.state_bytes, st.activation_bytes, state_per_param),
    } for s, st in enumerate(stages))
    fullest = max(range(len(stages)), key=lambda s: stages[s].memory_bytes)
    return Breakdown(price.step_time_s, _nonzero(time), (("gradient sync overlapped", 0.0),),
                     memory_parts(stages[fullest].state_bytes,
                                  stages[fullest].activation_bytes, state_per_param),
                     per_stage)


def single_mesh_breakdown(total_s: float, k: int, compute_by_class: Sequence[tuple[str, float]],
                          comm_s: float, grad_sync_s: float, update_s: float, launch_s: float,
                          recompute_share: float, memory_bytes: float) -> Breakdown:
    """The breakdown of a single-mesh plan: ``k`` micro-batches of ``compute_by_class`` and
    ``comm_s`` (activation collectives), the gradient sync and update once, one launch;
    memory is the ILP's peak, not split (the single-mesh memory model is one peak)."""
    time = _split_compute(compute_by_class, recompute_share, k) + [
        ("activation collectives", k * comm_s), ("gradient sync (exposed)", grad_sync_s),
        ("optimizer update", update_s), ("program launch", launch_s)]
    rest = total_s - sum(v for _, v in time)
    time.append(("unattributed", rest))
    return Breakdown(total_s, _nonzero(time), (("gradient sync overlapped", 0.0),),
                     (("peak (state, activations and temporaries)", memory_bytes),))


def _nonzero(parts) -> tuple[tuple[str, float], ...]:
    return tuple((n, float(s)) for n, s in parts if abs(s) > 1e-12)


def format_side_by_side(breakdowns: Mapping[str, Breakdown]) -> str:
    """One column per method, one row per part (seconds), then the totals."""
    names = list(breakdowns)
    parts = list(dict.fromkeys(p for b in breakdowns.values() for p, _ in b.time))
    width = max([len(p) for p in parts] + [10]) + 2
    lines = [f"{'':<{width}}" + "".join(f"{n:>14}" for n in names)]
    for part in parts:
        row = [dict(breakdowns[n].time).get(part) for n in names]
        lines.append(f"{part:<{width}}" + "".join(
            f"{'-' if v is None else f'{v:.4g} s':>14}" for v in row))
    lines.append(f"{'predicted step':<{width}}" + "".join(
        f"{breakdowns[n].total_s:>12.4g} s" for n in names))
    return "\n".join(lines)


def plan_breakdown(plan) -> Breakdown:
    """`ParallelPlan.explain`: a simulated plan's own breakdown; for a plan of
    `parallelize(...).plan(...)`, one from what the plan records: a single-mesh plan's
    operators by class (their compute shares split the per-micro-batch time; the optimizer
    update's collectives are counted with it), or a pipeline's stage times (bubble,
    gradient sync and update as above; per-stage compute is not split by class there).

    Raises:
        InvalidConfigError: for a plan that records no prediction (a loaded plan of an old
            format).
    """
    from alpa_lite.errors import InvalidConfigError
    from alpa_lite.inter_op.pricing import compute_class
    from jax.extend.core import primitives as prims

    own = getattr(plan.extra, "breakdown", None)
    if own is not None:
        return own
    total, k = plan.predicted_step_time_s, plan.num_micro_batches
    if total != total:  # NaN
        raise InvalidConfigError(
            "This plan records no predicted step time to explain; plan again with "
            "parallelize(...).plan(...) or alpa_lite.simulate.simulate.")
    if plan.sharding is not None:
        sync = float(getattr(plan.extra, "grad_sync_s", 0.0))
        update = float(getattr(plan.extra, "apply_s", 0.0))
        by_class: dict[str, float] = {}
        for d in plan.sharding.nodes:
            primitive = getattr(prims, f"{d.primitive}_p", None)
            name = "data movement and other" if primitive is None else compute_class(primitive)
            by_class[name] = by_class.get(name, 0.0) + d.compute_s
        compute = max(plan.sharding.compute_s - update, 0.0)
        scale = compute / plan.sharding.compute_s if plan.sharding.compute_s > 0 else 0.0
        comm = plan.sharding.compute_s + plan.sharding.objective - sync - update - compute
        launch = plan.sharding.mesh.launch_latency_s
        return single_mesh_breakdown(total, k, [(n, s * scale) for n, s in by_class.items()],
                                     comm, sync, update, launch, 0.0,
                                     plan.sharding.peak_memory_bytes)
    stages = plan.stages
    times = [st.forward_s + st.backward_s for st in stages]
    slowest = max(range(len(stages)), key=lambda s: times[s])
    once = max(range(len(stages)), key=lambda s: stages[s].grad_sync_s + stages[s].apply_s)
    parts = [("stage compute and collectives (slowest stage, k micro-batches)",
              k * times[slowest]),
             ("pipeline bubble", sum(times) - times[slowest]),
             ("gradient sync (exposed)", stages[once].grad_sync_s),
             ("optimizer update", stages[once].apply_s)]
    parts.append(("other (stages sharing a host, launches)", total - sum(s for _, s in parts)))
    per_stage = tuple({"stage": st.stage,
                       "time_per_micro_batch": (("forward", st.forward_s),
                                                ("backward", st.backward_s)),
                       "once_per_step": (("gradient sync", st.grad_sync_s),
                                         ("optimizer update", st.apply_s)),
                       "memory": (("peak", st.peak_memory_bytes),)} for st in stages)
    return Breakdown(total, _nonzero(parts), (("gradient sync overlapped", 0.0),),
                     (("peak of the fullest stage", plan.peak_memory_bytes),), per_stage)
