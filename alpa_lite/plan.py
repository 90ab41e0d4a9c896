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
from alpa_lite.mesh import LogicalMesh, Spec, format_spec, replicated_spec
from alpa_lite.summary import format_plan_summary

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
        comm_s: predicted collective time of the strategy per step (times the trip count
            inside a loop body; ``collectives`` lists one run's).
        compute_s: predicted compute time of the operator on one device under the strategy,
            per step.
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
    compute_s: float = 0.0
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
class StagePlan:
    """One pipeline stage of a plan: what runs where and what it is predicted to cost.

    Attributes:
        stage: its index (0 reads the batch).
        layers: the layers it runs.
        submesh: ``(hosts, devices per host)`` it runs on.
        logical_mesh: the logical view of the submesh its sharding plan uses.
        forward_s / backward_s: predicted seconds of one micro-batch's forward / backward
            (layers' compute and collectives, launches, the transfer of its boundary).
        grad_sync_s: predicted seconds of its gradient sync (once per step).
        apply_s: predicted seconds of its optimizer update (once per step, with its launch).
        peak_memory_bytes: predicted peak per device: parameters, gradients, optimizer
            state, and the activations its schedule keeps in flight.
        plan: the stage's intra-op `ShardingPlan` (None in a simulation, which prices the
            stage from its layers' plans).
        num_operators: operators in its forward and backward programs.
        remat: whether its layers' forwards are recomputed in the backward pass.
        lean: the memory price level its layer plans were priced at (0: the fastest plans;
            else one of `pricing.LEAN_LEVELS`, a plan trading time for sharded state).
    """

    stage: int
    layers: tuple[int, ...]
    submesh: tuple[int, int]
    logical_mesh: tuple[int, ...]
    forward_s: float
    backward_s: float
    grad_sync_s: float
    peak_memory_bytes: float
    plan: ShardingPlan | None
    num_operators: int = 0
    apply_s: float = 0.0
    remat: bool = False
    lean: float = 0.0

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data.update(layers=list(self.layers), submesh=list(self.submesh),
                    logical_mesh=list(self.logical_mesh),
                    plan=None if self.plan is None else _sharding_to_dict(self.plan))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "StagePlan":
        return cls(stage=data["stage"], layers=tuple(data["layers"]),
                   submesh=tuple(data["submesh"]), logical_mesh=tuple(data["logical_mesh"]),
                   forward_s=data["forward_s"], backward_s=data["backward_s"],
                   grad_sync_s=data.get("grad_sync_s", 0.0),
                   peak_memory_bytes=data["peak_memory_bytes"],
                   plan=None if data["plan"] is None else _sharding_from_dict(data["plan"]),
                   num_operators=data.get("num_operators", 0),
                   apply_s=data.get("apply_s", 0.0), remat=data.get("remat", False),
                   lean=data.get("lean", 0.0))


@dataclasses.dataclass(frozen=True)
class SingleMeshInfo:
    """What a ShardParallel-family plan predicts beyond its `ShardingPlan`.

    Attributes:
        grad_sync_s: seconds per step of the gradient all-reduces (once per step).
        apply_s: seconds per step of the optimizer update.
        predicted_step_time_s: seconds per step (`intra_op.driver.single_mesh_step_time_s`).
        remat_layers: per layer, rematerialized or not (when a layer option was given).
    """

    grad_sync_s: float
    apply_s: float
    predicted_step_time_s: float
    remat_layers: tuple[bool, ...] | None = None

    def to_dict(self) -> dict:
        out = {"grad_sync_s": self.grad_sync_s, "apply_s": self.apply_s,
               "predicted_step_time_s": self.predicted_step_time_s}
        if self.remat_layers is not None:
            out["remat_layers"] = list(self.remat_layers)
        return out


@dataclasses.dataclass(frozen=True)
class OneStageInfo:
    """A pipeline plan of one stage, run as ShardParallel on that stage's mesh.

    Attributes:
        logical_mesh: the stage's logical mesh shape.
        submesh: its submesh ``(hosts, devices per host)``.
        remat: whether its layers are rematerialized.
        lean: the memory price level of its plan (0: the fastest plan).
        stage_memory_bytes: the stage DP's predicted memory per stage (automatic stages).
        predicted_step_time_s: seconds per step of the ShardParallel plan it runs (None in
            plans saved before it was recorded).
    """

    logical_mesh: tuple[int, ...]
    submesh: tuple[int, int]
    remat: bool = False
    lean: float = 0.0
    stage_memory_bytes: tuple[float, ...] | None = None
    predicted_step_time_s: float | None = None

    def to_dict(self) -> dict:
        out = {"one_stage": "a single stage runs as ShardParallel on its mesh",
               "logical_mesh": list(self.logical_mesh), "submesh": list(self.submesh),
               "remat": self.remat, "lean": self.lean}
        if self.stage_memory_bytes is not None:
            out["stage_memory_bytes"] = list(self.stage_memory_bytes)
        if self.predicted_step_time_s is not None:
            out["predicted_step_time_s"] = self.predicted_step_time_s
        return out


@dataclasses.dataclass(frozen=True)
class PipelineInfo:
    """What a pipeline plan predicts and how its layers were made.

    Attributes:
        predicted_step_time_s: seconds per step (`inter_op.pricing.pipeline_step_time_s`).
        schedule: the schedule run: ``"1f1b"``, ``"gpipe"``, ``"interleaved-1f1b"`` or
            ``"zb-h1"`` (``"auto"`` is resolved when planning).
        layers: the `alpa_lite.layers.LayerRecord` of the trace (as a dict in JSON).
        num_layers: layers in the trace.
        memory_budget_bytes: the memory budget per device planned for (None: none).
        virtual_stages: model chunks per stage (interleaved; else 1).
        runner_up: the next best schedule the planner priced, ``(schedule, virtual stages,
            predicted step time, fits the memory budget)``, or None.
    """

    predicted_step_time_s: float
    schedule: str
    layers: Any
    num_layers: int
    memory_budget_bytes: float | None = None
    virtual_stages: int = 1
    runner_up: tuple | None = None

    def to_dict(self) -> dict:
        return {"objective": self.predicted_step_time_s,
                "predicted_step_time_s": self.predicted_step_time_s,
                "schedule": self.schedule, "virtual_stages": self.virtual_stages,
                "runner_up": None if self.runner_up is None else list(self.runner_up),
                "layers": None if self.layers is None else self.layers.to_dict(),
                "num_layers": self.num_layers, "memory_budget_bytes": self.memory_budget_bytes}


@dataclasses.dataclass(frozen=True)
class SimulationInfo:
    """What planning for a cluster you do not have (`alpa_lite.simulate`) adds to a plan.

    Attributes:
        method: the simulated method: ``"auto"`` (pipeline search), ``"megatron"`` (the
            best (dp, tp, pp) grid layout), ``"shard"``, ``"dp"``, ``"zero2"``, ``"zero3"``.
        predicted_step_time_s: predicted seconds per step.
        memory_per_device_bytes: predicted peak memory of the fullest device.
        fits_memory: whether that fits the cluster's memory (None: not judged).
        remat: the rematerialization mode asked for (``"off"``, ``"layer"``, ``"auto"``).
        dtype: the compute dtype.
        logical_mesh: single-mesh methods: the logical mesh chosen.
        grid: ``"megatron"``: ``(dp, tp, pp)`` of the layout chosen.
        remat_layers / lean: ``"megatron"``: whether its layers are rematerialized, and
            their memory price level.
        dp_layers / priced_at_micro_batches / lean_offered: ``"auto"``: the stage DP's layer
            count, the micro-batch count layers were priced at, whether memory-lean plans
            were offered.
        ilp_variables / ilp_status: single-mesh methods: the ILP's size and status.
        layout: the named layout this result is (`alpa_lite.layout.Layout.to_dict`), for
            ``"megatron"``, ``"dp"``, ``"zero2"``, ``"zero3"``; None for searched plans.
        breakdown: where the predicted step time and memory go (`alpa_lite.explain`).
        schedule / virtual_stages / runner_up: ``"auto"``: the pipeline schedule chosen, its
            model chunks per stage, and the next best ``(schedule, chunks, step seconds,
            fits)``.
    """

    method: str
    predicted_step_time_s: float
    memory_per_device_bytes: float
    fits_memory: bool | None = None
    remat: str = "off"
    dtype: str = "float32"
    logical_mesh: tuple[int, ...] | None = None
    grid: tuple[int, int, int] | None = None
    remat_layers: bool | None = None
    lean: float | None = None
    dp_layers: int | None = None
    priced_at_micro_batches: int | None = None
    lean_offered: bool | None = None
    ilp_variables: int | None = None
    ilp_status: str | None = None
    layout: dict | None = None
    breakdown: object | None = None  # an `alpa_lite.explain.Breakdown`
    schedule: str | None = None
    virtual_stages: int = 1
    runner_up: tuple | None = None

    def details(self, num_micro_batches: int) -> dict:
        """The method-specific numbers as the CLI's JSON ``details`` has them."""
        out: dict = {"num_micro_batches": num_micro_batches}
        if self.grid is not None:
            out.update(dp=self.grid[0], tp=self.grid[1], pp=self.grid[2])
        if self.logical_mesh is not None:
            out["logical_mesh"] = list(self.logical_mesh)
        for key in ("dp_layers", "fits_memory", "priced_at_micro_batches", "lean_offered",
                    "remat_layers", "lean", "schedule"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.schedule is not None:
            out["virtual_stages"] = self.virtual_stages
            out["runner_up"] = None if self.runner_up is None else list(self.runner_up)
        if self.ilp_status is not None:
            out["ilp"] = {"num_variables": self.ilp_variables, "status": self.ilp_status}
        return {**out, "remat": self.remat, "dtype": self.dtype}

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("logical_mesh", "grid"):
            out[key] = None if out[key] is None else list(out[key])
        out["breakdown"] = None if self.breakdown is None else self.breakdown.to_dict()
        return {"simulation": True, **out}


def extra_from_dict(method: str, data: dict | None):
    """The typed record of a plan's JSON ``extra`` (None when empty)."""
    from alpa_lite.layers import LayerRecord  # the layer record is made by tracing

    if not data:
        return None
    if data.get("simulation"):
        fields = {k: v for k, v in data.items() if k != "simulation"}
        for key in ("logical_mesh", "grid", "runner_up"):
            fields[key] = None if fields.get(key) is None else tuple(fields[key])
        if fields.get("breakdown") is not None:
            from alpa_lite.explain import Breakdown  # explain formats with the cluster module

            fields["breakdown"] = Breakdown.from_dict(fields["breakdown"])
        return SimulationInfo(**fields)
    if "one_stage" in data:
        memory = data.get("stage_memory_bytes")
        return OneStageInfo(tuple(data["logical_mesh"]),
                            tuple(data.get("submesh") or (1, math.prod(data["logical_mesh"]))),
                            bool(data.get("remat", False)), float(data.get("lean", 0.0)),
                            None if memory is None else tuple(memory),
                            data.get("predicted_step_time_s"))
    if method == "PipeshardParallel":
        layers = data.get("layers")
        runner_up = data.get("runner_up")
        return PipelineInfo(data["predicted_step_time_s"], data["schedule"],
                            LayerRecord.from_dict(layers) if layers else None,
                            data["num_layers"], data.get("memory_budget_bytes"),
                            int(data.get("virtual_stages", 1)),
                            None if runner_up is None else tuple(runner_up))
    flags = data.get("remat_layers")
    if "predicted_step_time_s" not in data:  # saved before the gradient sync was split out
        return None
    return SingleMeshInfo(data["grad_sync_s"], data["apply_s"], data["predicted_step_time_s"],
                          None if flags is None else tuple(bool(f) for f in flags))


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """What `parallelize(...).plan(...)` returns.

    Attributes:
        method: the method's name (``"ShardParallel"``, ``"DataParallel"``, ...).
        num_micro_batches: micro-batches per step (1 = none).
        sharding: the intra-op plan (for ShardParallel-family methods).
        plan_time_s: seconds spent tracing and solving.
        stages: one `StagePlan` per stage for pipelined methods (empty otherwise).
        extra: what the method predicts beyond the intra-op plan: `SingleMeshInfo`,
            `OneStageInfo`, `PipelineInfo`, or `SimulationInfo` for a plan made by
            `alpa_lite.simulate` (None for a bare intra-op plan).
    """

    method: str
    num_micro_batches: int
    sharding: ShardingPlan | None
    plan_time_s: float
    stages: tuple[StagePlan, ...] = ()
    extra: SingleMeshInfo | OneStageInfo | PipelineInfo | SimulationInfo | None = None

    @property
    def objective(self) -> float:
        if self.sharding is not None:
            return self.sharding.objective
        return float(getattr(self.extra, "predicted_step_time_s", math.nan))

    @property
    def predicted_step_time_s(self) -> float:
        """The planner's predicted seconds per step (`inter_op.pricing` for pipelines,
        `intra_op.driver.single_mesh_step_time_s` otherwise)."""
        predicted = getattr(self.extra, "predicted_step_time_s", None)
        if predicted is not None:
            return float(predicted)
        if self.sharding is not None:  # plans saved before the gradient sync was split out
            return self.num_micro_batches * self.sharding.compute_s + self.sharding.objective
        return math.nan

    @property
    def peak_memory_bytes(self) -> float:
        """Predicted peak memory per device (bytes), for every method.

        The intra-op plan's peak for the ShardParallel family; a simulation's predicted peak;
        for pipelines, the largest of the stages' peaks (each stage runs on its own devices);
        NaN when the plan has none of these.

        Example:
            >>> ParallelPlan("ShardParallel", 1, None, 0.0).peak_memory_bytes
            nan
        """
        if self.sharding is not None:
            return float(self.sharding.peak_memory_bytes)
        if isinstance(self.extra, SimulationInfo):
            return float(self.extra.memory_per_device_bytes)
        return max((float(s.peak_memory_bytes) for s in self.stages), default=math.nan)

    def explain(self):
        """Where the predicted step time and memory go: an `alpa_lite.explain.Breakdown`
        (``.format()`` prints it; `alpa-lite plan --explain` shows a simulation's)."""
        from alpa_lite.explain import plan_breakdown  # explain formats with the cluster module

        return plan_breakdown(self)

    def summary(self, max_rows: int = 40) -> str:
        """A readable table: mesh, objective, solver, inputs and the main operator choices."""
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
            stages=tuple(StagePlan.from_dict(st) for st in data.get("stages", ())),
            extra=extra_from_dict(data["method"], data.get("extra")),
        )


def _spec_to_json(spec):
    return None if spec is None else [list(axes) for axes in spec]


def _spec_from_json(data) -> Spec | None:
    return None if data is None else tuple(tuple(axes) for axes in data)


def _to_jsonable(plan: ParallelPlan) -> dict[str, Any]:
    return {
        "format_version": PLAN_FORMAT_VERSION, "method": plan.method,
        "num_micro_batches": plan.num_micro_batches, "plan_time_s": plan.plan_time_s,
        "sharding": None if plan.sharding is None else _sharding_to_dict(plan.sharding),
        "stages": [st.to_dict() for st in plan.stages],
        "extra": {} if plan.extra is None else plan.extra.to_dict(),
    }


def _sharding_to_dict(s: ShardingPlan) -> dict[str, Any]:
    return {
        "mesh": s.mesh.to_dict(),
        "input_specs": [_spec_to_json(x) for x in s.input_specs],
        "output_specs": [_spec_to_json(x) for x in s.output_specs],
        "nodes": [{
            "index": n.index, "primitive": n.primitive, "strategy": n.strategy,
            "in_specs": [_spec_to_json(x) for x in n.in_specs],
            "out_specs": [_spec_to_json(x) for x in n.out_specs],
            "anchor": n.anchor, "fallback": n.fallback, "comm_s": n.comm_s,
            "compute_s": n.compute_s,
            "collectives": [[k, list(a), b] for k, a, b in n.collectives],
        } for n in s.nodes],
        "objective": s.objective, "compute_s": s.compute_s,
        "peak_memory_bytes": s.peak_memory_bytes, "solver": s.solver,
        "graph_fingerprint": s.graph_fingerprint, "input_names": list(s.input_names),
    }


def _sharding_from_dict(data: dict) -> ShardingPlan:
    nodes = tuple(NodeDecision(
        index=n["index"], primitive=n["primitive"], strategy=n["strategy"],
        in_specs=tuple(_spec_from_json(x) for x in n["in_specs"]),
        out_specs=tuple(_spec_from_json(x) for x in n["out_specs"]),
        anchor=n["anchor"], fallback=n["fallback"], comm_s=n["comm_s"],
        compute_s=n.get("compute_s", 0.0),
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


def value_specs(graph, plan: ShardingPlan) -> dict[int, Spec]:
    """The planned spec of every value id of ``graph`` (the `OpGraph` ``plan`` was made for)."""
    specs: dict[int, Spec] = dict(zip(graph.inputs, plan.input_specs))
    for vid, _ in graph.consts:
        specs[vid] = replicated_spec(len(graph.avals[vid].shape))
    decisions = {d.index: d for d in plan.nodes}
    for node in graph.nodes:
        decision = decisions.get(node.index)
        if decision is None:  # transparent: outputs are the inputs
            for src, dst in zip(node.invars, node.outvars):
                specs[dst] = specs[src] if isinstance(src, int) else replicated_spec(
                    len(graph.avals[dst].shape))
            continue
        for vid, spec in zip(node.outvars, decision.out_specs):
            specs[vid] = spec
    return specs


def describe_specs(specs) -> str:
    return " ".join(format_spec(s) for s in specs)
