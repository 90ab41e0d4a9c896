"""Plain-text plan summaries (what `ParallelPlan.summary()` prints)."""

from __future__ import annotations

from collections import Counter

from alpa_lite.intra_op.strategies import format_spec


def _format_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"


def format_plan_summary(plan, *, max_rows: int = 40) -> str:
    """The summary of a ParallelPlan: mesh, costs, solver, inputs, notable operators."""
    lines = [f"{plan.method}  micro-batches={plan.num_micro_batches}  "
             f"plan time {plan.plan_time_s:.2f}s"]
    s = plan.sharding
    if s is None:
        return "\n".join(lines + _stage_lines(plan))
    remat, flags = getattr(plan.extra, "remat", None), getattr(plan.extra, "remat_layers", None)
    if remat is not None:  # a one-stage pipeline
        lines.append(f"rematerialized layers: {'yes' if remat else 'no'}")
    if flags is not None:
        lines.append(f"rematerialized layers: {sum(flags)} of {len(flags)} "
                     f"({', '.join(str(i) for i, f in enumerate(flags) if f) or 'none'})")
    mesh = s.mesh
    lines.append(f"logical mesh {mesh.shape} axes {mesh.axis_names} alpha {mesh.alpha_s} "
                 f"beta {mesh.beta_s_per_byte}")
    lines.append(f"objective (communication) {s.objective:.6g}   predicted compute "
                 f"{s.compute_s:.4g}s   peak memory/device {_format_bytes(s.peak_memory_bytes)}")
    sv = s.solver
    lines.append(f"solver {sv.get('name')} {sv.get('status')} in {sv.get('solve_time_s', 0):.2f}s: "
                 f"{sv.get('num_units')} operators -> {sv.get('num_groups')} groups, "
                 f"{sv.get('num_variables')} variables, {sv.get('num_constraints')} constraints")
    counts = s.collective_counts()
    lines.append("planned collectives: " + (", ".join(f"{k} x{v}" for k, v in sorted(
        counts.items())) or "none"))
    fallbacks = s.fallback_primitives
    lines.append("replicated fallback (no sharding rule): " + (", ".join(fallbacks) or "none"))
    lines.append("")
    lines.append(f"{'input':<48} spec")
    for name, spec in list(zip(s.input_names, s.input_specs))[:max_rows]:
        lines.append(f"{name[:48]:<48} {format_spec(spec)}")
    if len(s.input_specs) > max_rows:
        lines.append(f"... {len(s.input_specs) - max_rows} more inputs")
    heavy = [n for n in s.nodes if n.collectives or n.primitive in (
        "dot_general", "conv_general_dilated")]
    lines.append("")
    lines.append(f"{'#':>5} {'operator':<22} {'strategy':<26} {'operands -> result':<40} comm")
    for n in heavy[:max_rows]:
        specs = " ".join(format_spec(x) for x in n.in_specs) + " -> " + " ".join(
            format_spec(x) for x in n.out_specs)
        lines.append(f"{n.index:>5} {n.primitive:<22} {n.strategy[:26]:<26} {specs[:40]:<40} "
                     f"{n.comm_s:.3g}")
    if len(heavy) > max_rows:
        lines.append(f"... {len(heavy) - max_rows} more matmuls/collectives")
    kinds = Counter(n.primitive for n in s.nodes)
    lines.append(f"operators: {sum(kinds.values())} ({', '.join(f'{k} {v}' for k, v in kinds.most_common(6))}, ...)")
    return "\n".join(lines)


def _schedule_text(extra) -> str:
    """``zb-h1 (runner-up 1f1b: 1.2s)``: the schedule run, its chunks per stage, and the
    next best schedule the planner priced (faster but over the memory budget, it says so)."""
    text = str(getattr(extra, "schedule", None))
    if getattr(extra, "virtual_stages", 1) > 1:
        text += f" x{extra.virtual_stages} chunks per stage"
    runner_up = getattr(extra, "runner_up", None)
    if runner_up:
        name, chunks, seconds, *fits = runner_up  # plans before 2026-12-07 have no fits
        text += (f" (runner-up {name}{f' x{chunks}' if chunks > 1 else ''}: "
                 f"{seconds:.4g}s{'' if all(fits) else ', over the memory budget'})")
    return text


def _stage_lines(plan) -> list[str]:
    extra, nan = plan.extra, float("nan")
    layers = getattr(extra, "layers", None)
    imbalance = nan if layers is None or layers.imbalance is None else layers.imbalance
    lines = [f"schedule {_schedule_text(extra)}  layers "
             f"{getattr(extra, 'num_layers', None)} (clustering: "
             f"{getattr(layers, 'method', None)}, flops imbalance {imbalance:.2f})",
             f"predicted step time {plan.predicted_step_time_s:.4g}s "
             "(the schedule's fill and drain + micro-batches at the slowest stage + gradient "
             "sync and update; stages sharing a host's compute take turns)", "",
             f"{'stage':>5} {'layers':<14} {'submesh':<9} {'logical':<9} {'fwd (s)':>10} "
             f"{'bwd (s)':>10} {'peak mem':>12} {'operators':>9} {'remat':>5} {'lean':>5}"]
    for st in plan.stages:
        layer_text = ",".join(str(x) for x in st.layers)
        lines.append(f"{st.stage:>5} {layer_text[:14]:<14} {str(st.submesh):<9} "
                     f"{str(st.logical_mesh):<9} {st.forward_s:>10.3g} "
                     f"{st.backward_s:>10.3g} {_format_bytes(st.peak_memory_bytes):>12} "
                     f"{st.num_operators:>9} {'yes' if st.remat else 'no':>5} "
                     f"{st.lean or 'no':>5}")
    return lines
