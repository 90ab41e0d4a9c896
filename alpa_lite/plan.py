"""Plans: the JSON-serialisable contract between the solvers and emit.

A `ShardingPlan` fixes one strategy per operator of a traced function (the intra-op ILP's
answer); a `ParallelPlan` wraps it with the method, micro-batching and (for pipelines) the
stages. Emit consumes plans and never calls a solver, so a plan saved with `to_json` can be
loaded with `from_json` and run without solving again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from alpa_lite.errors import InvalidConfigError
from alpa_lite.intra_op.strategies import Spec, format_spec
from alpa_lite.mesh import LogicalMesh

PLAN_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class NodeDecision:
    """The strategy picked for one operator.

    Attributes:
        index: the operator's index in the flattened graph.
        primitive: its primitive's name.
        strategy: the strategy's name.
        in_specs: spec required of each operand (None: literal or any).
        out_specs: spec of each output.
        anchor: emit pins the outputs with a sharding constraint (group leaders, collectives).
        fallback: replicated because no rule knew the primitive.
        comm_s: predicted collective time of the strategy.
        collectives: ``(kind, mesh axes, bytes per device)`` of each collective.
    """

    index: int
    primitive: str
    strategy: str
    in_specs: tuple[Spec | None, ...]
    out_specs: tuple[Spec, ...]
    anchor: bool = False
    fallback: bool = False
    comm_s: float = 0.0
    collectives: tuple[tuple[str, tuple[str, ...], float], ...] = ()


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """An intra-op plan for one function on one logical mesh.

    Attributes:
        mesh: the logical mesh (shape, axis names, alpha/beta).
        input_specs: spec of each flat input.
        output_specs: spec of each flat output.
        nodes: one decision per non-transparent operator (by graph index).
        objective: the ILP objective (communication + resharding seconds).
        compute_s: predicted compute seconds per device (flops / peak).
        peak_memory_bytes: predicted peak per-device memory.
        solver: solver statistics (name, status, seconds, variables, constraints, groups).
        graph_fingerprint: identifies the traced graph the plan belongs to.
    """

    mesh: LogicalMesh
    input_specs: tuple[Spec, ...]
    output_specs: tuple[Spec, ...]
    nodes: tuple[NodeDecision, ...]
    objective: float
    compute_s: float
    peak_memory_bytes: float
    solver: dict
    graph_fingerprint: str
    input_names: tuple[str, ...] = ()

    @property
    def fallback_primitives(self) -> tuple[str, ...]:
        return tuple(sorted({n.primitive for n in self.nodes if n.fallback}))

    def collective_counts(self) -> dict[str, int]:
        """How many collectives of each kind the plan itself asks for (no resharding)."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            for kind, _, _ in node.collectives:
                counts[kind] = counts.get(kind, 0) + 1
        return counts


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """What `parallelize(...).plan(...)` returns.

    Attributes:
        method: the method's name (``"ShardParallel"``, ``"DataParallel"``, ...).
        num_micro_batches: micro-batches per step (1 = none).
        sharding: the intra-op plan (for ShardParallel-family methods).
        plan_time_s: seconds spent tracing and solving.
        stages: per-stage plans for pipelined methods (empty otherwise).
        extra: method-specific data (JSON-compatible).
    """

    method: str
    num_micro_batches: int
    sharding: ShardingPlan | None
    plan_time_s: float
    stages: tuple = ()
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def objective(self) -> float:
        if self.sharding is not None:
            return self.sharding.objective
        return float(self.extra.get("objective", math.nan))

    @property
    def predicted_step_time_s(self) -> float:
        if self.sharding is not None:
            return self.num_micro_batches * self.sharding.compute_s + self.sharding.objective
        return float(self.extra.get("predicted_step_time_s", math.nan))

    @property
    def peak_memory_bytes(self) -> float:
        """Predicted peak memory per device (bytes), for every method.

        The intra-op plan's peak for the ShardParallel family; for pipelines, the largest of
        the stages' peaks (each stage runs on its own devices); NaN when the plan has neither.

        Example:
            >>> ParallelPlan("PipeshardParallel", 2, None, 0.0, stages=(
            ...     {"peak_memory_bytes": 3.0}, {"peak_memory_bytes": 5.0})).peak_memory_bytes
            5.0
        """
        if self.sharding is not None:
            return float(self.sharding.peak_memory_bytes)
        peaks = [float(s["peak_memory_bytes"]) for s in self.stages
                 if isinstance(s, dict) and "peak_memory_bytes" in s]
        return max(peaks) if peaks else math.nan

    def summary(self, max_rows: int = 40) -> str:
        """A readable table: mesh, objective, solver, inputs and the main operator choices."""
        from alpa_lite.summary import format_plan_summary

        return format_plan_summary(self, max_rows=max_rows)

    def to_json(self) -> str:
        return json.dumps(_to_jsonable(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ParallelPlan":
        data = json.loads(text)
        if data.get("format_version") != PLAN_FORMAT_VERSION:
            raise InvalidConfigError(
                f"Plan format version {data.get('format_version')!r} is not supported; expected "
                f"{PLAN_FORMAT_VERSION}. Re-create the plan with this alpa_lite version."
            )
        sharding = data["sharding"]
        return cls(
            method=data["method"],
            num_micro_batches=data["num_micro_batches"],
            sharding=None if sharding is None else _sharding_from_dict(sharding),
            plan_time_s=data["plan_time_s"],
            stages=tuple(data.get("stages", ())),
            extra=data.get("extra", {}),
        )


def _spec_to_json(spec):
    return None if spec is None else [list(axes) for axes in spec]


def _spec_from_json(data) -> Spec | None:
    return None if data is None else tuple(tuple(axes) for axes in data)


def _to_jsonable(plan: ParallelPlan) -> dict[str, Any]:
    sharding = None
    if plan.sharding is not None:
        s = plan.sharding
        sharding = {
            "mesh": s.mesh.to_dict(),
            "input_specs": [_spec_to_json(x) for x in s.input_specs],
            "output_specs": [_spec_to_json(x) for x in s.output_specs],
            "nodes": [{
                "index": n.index, "primitive": n.primitive, "strategy": n.strategy,
                "in_specs": [_spec_to_json(x) for x in n.in_specs],
                "out_specs": [_spec_to_json(x) for x in n.out_specs],
                "anchor": n.anchor, "fallback": n.fallback, "comm_s": n.comm_s,
                "collectives": [[k, list(a), b] for k, a, b in n.collectives],
            } for n in s.nodes],
            "objective": s.objective, "compute_s": s.compute_s,
            "peak_memory_bytes": s.peak_memory_bytes, "solver": s.solver,
            "graph_fingerprint": s.graph_fingerprint, "input_names": list(s.input_names),
        }
    return {
        "format_version": PLAN_FORMAT_VERSION, "method": plan.method,
        "num_micro_batches": plan.num_micro_batches, "plan_time_s": plan.plan_time_s,
        "sharding": sharding, "stages": list(plan.stages), "extra": plan.extra,
    }


def _sharding_from_dict(data: dict) -> ShardingPlan:
    nodes = tuple(NodeDecision(
        index=n["index"], primitive=n["primitive"], strategy=n["strategy"],
        in_specs=tuple(_spec_from_json(x) for x in n["in_specs"]),
        out_specs=tuple(_spec_from_json(x) for x in n["out_specs"]),
        anchor=n["anchor"], fallback=n["fallback"], comm_s=n["comm_s"],
        collectives=tuple((k, tuple(a), b) for k, a, b in n["collectives"]),
    ) for n in data["nodes"])
    return ShardingPlan(
        mesh=LogicalMesh.from_dict(data["mesh"]),
        input_specs=tuple(_spec_from_json(x) for x in data["input_specs"]),
        output_specs=tuple(_spec_from_json(x) for x in data["output_specs"]),
        nodes=nodes, objective=data["objective"], compute_s=data["compute_s"],
        peak_memory_bytes=data["peak_memory_bytes"], solver=data["solver"],
        graph_fingerprint=data["graph_fingerprint"], input_names=tuple(data["input_names"]),
    )


def describe_specs(specs) -> str:
    return " ".join(format_spec(s) for s in specs)
