"""Planning for clusters you do not have: predicted plans from abstract shapes.

Input: a model preset (`alpa_lite.models.presets`), a `ClusterSpec`, a method. Output: the
same `ParallelPlan` record `parallelize(...).plan(...)` returns, with `StagePlan`s for
pipelines and a `SimulationInfo` (predicted step time, memory per device, whether it fits,
the method's own numbers); `simulation_to_dict` gives the CLI's JSON. Nothing is allocated:
models are traced from `jax.ShapeDtypeStruct`s, by the planners' own tracing
(`step.trace_step`) and planners (`intra_op.driver.plan_single_mesh`, `inter_op.pricing`).

Search cost is kept small by reusing work across identical layers (transformer blocks):

* Pipelines: the model is traced with 3 blocks; its 3 layers (embedding + block, block,
  block + head) are each priced once per candidate (submesh, logical view) with the intra-op
  ILP; an L-block model's layer costs are ``[first, middle x (L - 2), last]``. The stage DP
  sees every block when there are at most as many blocks as devices (so any stage, down to one
  block per device, can be chosen), else ``max(MAX_DP_LAYERS, devices)`` contiguous groups
  of blocks (`dp_layer_count`).
* Single-mesh methods (auto sharding, data parallel, ZeRO): the full step is planned with 2 and
  3 blocks (identical blocks share one strategy choice); cost, compute and memory of L blocks
  are extrapolated linearly, exact when blocks are identical.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import itertools
import math
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np

from alpa_lite.cluster import ClusterSpec
from alpa_lite.config import (SCHEDULES, AutoLayerOption, DataParallel, ShardParallel,
                              Zero2Parallel, Zero3Parallel)
from alpa_lite.devices import stage_link
from alpa_lite.errors import InfeasiblePlanError, InvalidConfigError
from alpa_lite.explain import pipeline_breakdown, single_mesh_breakdown
from alpa_lite.intra_op.problem import InputRole, SpecPolicy
from alpa_lite.layout import Layout
from alpa_lite.models.presets import ModelPreset
from alpa_lite.models.train import build_workload
from alpa_lite.profiling.compute import progress_bar
from alpa_lite.inter_op import assignment as sp
from alpa_lite.intra_op.driver import plan_single_mesh, single_mesh_step_time_s
from alpa_lite.step import StepSpec, input_roles, optimizer_state_mask, trace_step
from alpa_lite.search_workers import price_candidates, worker_pool
from alpa_lite.inter_op import pricing
from alpa_lite.inter_op.pricing import memory_binds
from alpa_lite.inter_op.schedule_choice import choose_schedule, interleaved_layers
from alpa_lite.pipeline_model.partition import count_layers
from alpa_lite.plan import ParallelPlan, SimulationInfo, StagePlan

MAX_DP_LAYERS = 32
# --remat mode -> the rematerialization flags tried, plain first
_REMAT_FLAGS = {"off": (False,), "layer": (True,), "auto": (False, True)}
# the progress callback of the running `simulate` call (layer pricing reports to it)
_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("alpa_lite_progress", default=None)
METHODS = ("auto", "shard", "dp", "zero2", "zero3", "megatron")
REMAT_MODES = ("off", "layer", "auto")
_METHODS = {SpecPolicy.AUTO: ShardParallel, SpecPolicy.DATA: DataParallel,
            SpecPolicy.ZERO2: Zero2Parallel, SpecPolicy.ZERO3: Zero3Parallel}
_POLICIES = {"shard": SpecPolicy.AUTO, "dp": SpecPolicy.DATA, "zero2": SpecPolicy.ZERO2,
             "zero3": SpecPolicy.ZERO3}


_METHOD_CLASSES = {"auto": "PipeshardParallel", "megatron": "PipeshardParallel",
                   "shard": "ShardParallel", "dp": "DataParallel", "zero2": "Zero2Parallel",
                   "zero3": "Zero3Parallel"}


def _simulated(k: int, info: SimulationInfo, stages=()) -> ParallelPlan:
    """A simulation's `ParallelPlan` (its search time is filled in by `simulate`)."""
    return ParallelPlan(method=_METHOD_CLASSES.get(info.method, info.method),
                        num_micro_batches=k, sharding=None, plan_time_s=0.0,
                        stages=tuple(stages), extra=info)


def _with_info(plan: ParallelPlan, **changes) -> ParallelPlan:
    return dataclasses.replace(plan, extra=dataclasses.replace(plan.extra, **changes))


def simulation_to_dict(plan: ParallelPlan) -> dict:
    """A simulated plan as the CLI's JSON has it: ``method``, ``predicted_step_time_s``,
    ``memory_per_device_bytes``, ``fits_memory``, ``search_time_s``, ``stages`` (blocks,
    submesh, logical mesh, time per micro-batch, memory, remat, lean; an interleaved stage's
    ``chunks`` as ``[first, last]`` block runs), ``details``, the
    named ``layout`` (None for searched plans; `alpa-lite plan --layout` takes this JSON
    back) and the ``breakdown`` (`alpa_lite.explain`)."""
    info = plan.extra
    return {"method": info.method, "predicted_step_time_s": info.predicted_step_time_s,
            "memory_per_device_bytes": info.memory_per_device_bytes,
            "fits_memory": info.fits_memory, "layout": info.layout,
            "breakdown": None if info.breakdown is None else info.breakdown.to_dict(),
            "search_time_s": plan.plan_time_s,
            "stages": [_stage_to_dict(st) for st in plan.stages],
            "details": info.details(plan.num_micro_batches)}


def _stage_to_dict(st: StagePlan) -> dict:
    runs = block_runs(st.layers)
    return {"blocks": [st.layers[0], st.layers[-1]], "submesh": list(st.submesh),
            "logical_mesh": list(st.logical_mesh),
            "time_per_micro_batch_s": st.forward_s + st.backward_s,
            "memory_per_device_bytes": st.peak_memory_bytes, "remat": st.remat,
            "lean": st.lean, **({"chunks": [list(r) for r in runs]} if len(runs) > 1 else {})}


def block_runs(blocks) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive blocks: one for a stage, one per chunk for
    an interleaved stage.

    Example:
        >>> block_runs((0, 1, 4, 5))
        [(0, 1), (4, 5)]
    """
    runs, start = [], blocks[0]
    for previous, block in zip(blocks, blocks[1:]):
        if block != previous + 1:
            runs.append((start, previous))
            start = block
    return runs + [(start, blocks[-1])]


def simulate(preset: ModelPreset, cluster: ClusterSpec, *, method: str = "auto",
             num_micro_batches: int | None = None, remat: str = "off",
             progress: bool = False, layout: Layout | None = None,
             schedule: str = "auto", workers: int | None = None) -> ParallelPlan:
    """Plans ``preset`` on ``cluster`` with ``method`` without devices or weights.

    Returns a `ParallelPlan` whose ``extra`` is a `SimulationInfo` (``plan.extra.method`` is
    ``method``; ``plan.plan_time_s`` the search time); pipelines have one `StagePlan` per
    stage, whose ``layers`` are the model's blocks.

    ``remat``: ``"off"`` keeps every activation, ``"layer"`` recomputes every layer's
    forward in the backward pass, ``"auto"`` lets the stage DP (or the Megatron grid, per
    layout) choose per stage the least time that fits; single-mesh methods take the faster
    of off and layer that fits. ``progress`` draws a `rich` progress line on stderr while
    layers are priced.

    ``layout`` (a `Layout`: Megatron's t/p/d/micro-batch size/schedule, or dp/ZeRO with a
    micro-batch size) prices that configuration as named instead of searching; its method
    and remat replace ``method`` and ``remat``.

    ``schedule`` (``method="auto"``): the pipeline schedule, ``"auto"`` (each of 1F1B, ZB-H1
    and interleaved 1F1B priced on the stages the DP chose; `inter_op.schedule_choice`),
    ``"1f1b"``, ``"gpipe"``, ``"zb-h1"`` or ``"interleaved-1f1b"`` (2 chunks per stage).

    ``workers``: processes that price layers (None: one per core, 1: this one only;
    `alpa_lite.search_workers`).

    The plans assume the train state is donated (``donate_argnums``), so the optimizer
    update writes the new state over the old one, as Alpa does.
    """
    if layout is not None:
        method, remat = layout.method, layout.remat
    if method not in METHODS:
        raise InvalidConfigError(f"method must be one of {METHODS}; got {method!r}.")
    if remat not in REMAT_MODES:
        raise InvalidConfigError(f"remat must be one of {REMAT_MODES}; got {remat!r}.")
    if schedule not in SCHEDULES:
        raise InvalidConfigError(f"schedule must be one of {SCHEDULES}; got {schedule!r}.")
    start = time.perf_counter()
    with progress_bar(progress, f"planning {preset.name}", None) as advance, \
            worker_pool(workers):
        token = _PROGRESS.set(advance)
        try:
            if layout is not None and method == "megatron":
                result = _megatron_layout(preset, cluster, layout)
            elif layout is not None:
                result = _single_mesh_layout(preset, cluster, layout)
            elif method == "auto":
                result = _simulate_pipeline(preset, cluster, num_micro_batches, remat,
                                            schedule)
            elif method == "megatron":
                result = _simulate_megatron(preset, cluster, num_micro_batches, remat)
            else:
                result = _simulate_single_mesh(preset, cluster, _POLICIES[method],
                                               num_micro_batches, remat)
        finally:
            _PROGRESS.reset(token)
    result = _with_info(result, method=method, remat=remat,
                        dtype=jnp.dtype(preset.config.dtype).name)
    return dataclasses.replace(result, plan_time_s=time.perf_counter() - start)


def _num_blocks(preset: ModelPreset) -> int:
    return preset.config.num_layers


def _micro_batch_preset(preset: ModelPreset, num_micro_batches: int, blocks: int) -> ModelPreset:
    batch = preset.default_batch_size
    if batch % num_micro_batches:
        raise InvalidConfigError(
            f"--micro-batches {num_micro_batches} does not divide the batch size {batch}.")
    return preset.with_overrides(num_layers=blocks, batch_size=batch // num_micro_batches)


def _default_micro_batches(preset: ModelPreset, cluster: ClusterSpec) -> int:
    batch = preset.default_batch_size
    k = max(1, min(batch, 4 * cluster.num_devices))
    while batch % k:
        k -= 1
    return k


# --- pipelines (auto) ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _layer_graph(preset, cluster, num_micro_batches, remat_layer: bool, megatron=None):
    """The 3-layer trace the pipeline prices come from: ``(graph, layers, options)``; with
    ``megatron`` (a (submesh, (dp, tp)) candidate) priced with Megatron's tensor parallelism
    (`SpecPolicy.MEGATRON`)."""
    small = _micro_batch_preset(preset, num_micro_batches, min(3, _num_blocks(preset)))
    work = build_workload(small, abstract=True)
    option = AutoLayerOption(layer_num=min(3, _num_blocks(small)), method="names",
                             remat_layer=remat_layer)
    trace = trace_step(work.train_step, (work.state, work.batch), StepSpec(), 1, analyse=False,
                       layer_option=option)  # the planners' tracing
    traced, graph = trace.traced, trace.graph
    roles = input_roles(traced, optimizer_state_mask((work.state, work.batch), StepSpec())[0])
    options = pricing.PricingOptions(
        time_limit_s=60.0, state_bytes_per_param_byte=pricing.estimate_state_bytes_per_param_byte(
            roles, [graph.avals[v] for v in graph.inputs]),
        param_positions=frozenset(i for i, r in enumerate(roles) if r is InputRole.PARAM),
        policy=SpecPolicy.AUTO if megatron is None else SpecPolicy.MEGATRON,
        input_roles=tuple(roles), num_micro_batches=num_micro_batches)
    return graph, count_layers(graph), options


@functools.lru_cache(maxsize=8)
def _priced_store(preset, cluster, counts: MicroBatchCounts, remat_layer: bool, megatron):
    """The candidates' layer prices found so far for one trace recipe (`_price_layers`)."""
    return {}


def _price_layers(preset, cluster, counts: MicroBatchCounts, remat_layer: bool = False,
                  megatron=None, only: frozenset | None = None):
    """Per (submesh, view) (those in ``only`` when given): the `LayerPrice`s of the 3
    traced layers (`inter_op.pricing`, the path `parallelize` uses) at its pricing count
    (`MicroBatchCounts.of`), each layer rematerialized if ``remat_layer``. Kept per recipe
    and candidate: `--compare` prices once for the pipeline search and the Megatron grid,
    and a search that priced some candidates prices only the others when it wants more."""
    store = _priced_store(preset, cluster, counts, remat_layer, megatron)
    wanted = [c for _, c in pricing_jobs(preset, cluster, counts, remat_layer, megatron)
              if only is None or c in only]
    missing = frozenset(c for c in wanted if c not in store)
    if missing:
        store.update(_price_levels(preset, cluster, counts, remat_layer, megatron, (0.0,),
                                   None, missing)[0.0])
    return {c: store[c] for c in wanted}


@functools.lru_cache(maxsize=8)
def _price_lean_layers(preset, cluster, counts: MicroBatchCounts, remat_layer: bool = False,
                       only: frozenset | None = None):
    """`_price_layers`' memory-lean plans, ``{level: prices}`` (`pricing.LEAN_LEVELS`), on
    the candidates ``only`` (None: all)."""
    fastest = _price_layers(preset, cluster, counts, remat_layer, None, only)
    return _price_levels(preset, cluster, counts, remat_layer, None, pricing.LEAN_LEVELS,
                         fastest, only)


def _price_levels(preset, cluster, counts, remat_layer, megatron, levels, fastest,
                  only=None):
    """`pricing.price_table` of the traced layers on the candidates (`pricing_jobs`; those
    in ``only`` when given), on every core when they are many (`alpa_lite.search_workers`)."""
    jobs = [job for job in pricing_jobs(preset, cluster, counts, remat_layer, megatron)
            if only is None or job[1] in only]
    return pricing.price_table(price_candidates(jobs, levels, fastest), levels,
                               progress=_PROGRESS.get())


def pricing_jobs(preset, cluster, counts: MicroBatchCounts, remat_layer: bool,
                 megatron=None) -> list[tuple[tuple, tuple]]:
    """``(recipe, candidate)`` per candidate (every (submesh, view) of the cluster, or the
    Megatron one), the recipe (`_layer_graph`'s arguments) at the candidate's pricing count;
    grouped by count, so each count is traced once."""
    candidates = [megatron] if megatron is not None else [
        (tuple(shape), view) for shape in candidate_submeshes(cluster)
        for view in candidate_views(shape)]
    jobs = [((preset, cluster, counts.of(c), remat_layer, megatron), c) for c in candidates]
    return sorted(jobs, key=lambda job: -job[0][2])


@dataclasses.dataclass(frozen=True)
class MicroBatchCounts:
    """The micro-batch counts a search tries (``options``, with ``default``) for a batch of
    ``batch`` sequences, and which of them each candidate (submesh, view) is priced at and
    offered at.

    A candidate prices its layers at one count (`of`): the most micro-batches among the
    options, at most the default, whose size is a multiple of the view's first axis (all
    its devices for a 1-D view), so that its plan can split every micro-batch over that
    axis. A plan priced at one micro-batch size holds for larger ones that axis divides
    (its prices scaled up, `_scaled`), not for smaller ones (`offers`). A candidate that
    no option lets split is priced at the default and offered at every count, its plan
    splitting what it can.

    Example (batch 512, one sequence per micro-batch by default):
        >>> counts = MicroBatchCounts(512, 512, (1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        >>> [counts.of(c) for c in (((1, 1), (1,)), ((1, 8), (2, 4)), ((16, 8), (32, 4)),
        ...                         ((3, 8), (24,)))]
        [512, 256, 16, 512]
        >>> counts.offers(((16, 8), (32, 4)), 16), counts.offers(((16, 8), (32, 4)), 32)
        (True, False)
    """

    batch: int
    default: int
    options: tuple[int, ...]

    @classmethod
    def exactly(cls, batch: int, k: int) -> "MicroBatchCounts":
        """Every candidate priced at ``k`` (a named layout's count)."""
        return cls(batch, k, (k,))

    def _splits(self, k: int, candidate) -> bool:
        return (self.batch // k) % candidate[1][0] == 0

    @functools.lru_cache(maxsize=None)  # asked per candidate, count and table by `_scaled`
    def of(self, candidate) -> int:
        return max((k for k in self.options if k <= self.default
                    and self._splits(k, candidate)), default=self.default)

    def offers(self, candidate, k: int) -> bool:
        priced = self.of(candidate)
        if not self._splits(priced, candidate):
            return True  # no option splits over its first axis: offered as priced
        return self._splits(k, candidate) and (k <= priced or priced == self.default)


# from this many hosts on, stages take whole hosts and the stage DP counts hosts
HOST_UNITS_FROM = 16


def device_unit(cluster: ClusterSpec) -> int:
    """The stage DP's unit of devices: a whole host on clusters of `HOST_UNITS_FROM` hosts
    or more (a search-space reduction of ours: stages smaller than a host are left out
    there, where a pipeline of at most one stage per layer spreads over many hosts
    anyway), else one device."""
    return cluster.devices_per_host if cluster.num_hosts >= HOST_UNITS_FROM else 1


def candidate_submeshes(cluster: ClusterSpec) -> list[tuple[int, int]]:
    """Alpa's submesh shapes, with host counts thinned on big clusters.

    Within a host: (1, 2^k) (only the whole host from `HOST_UNITS_FROM` hosts on). Across
    hosts: every (n, devices_per_host) up to 8 hosts; beyond that powers of two, divisors
    of the host count and the whole cluster (a search-space reduction of ours: Alpa tries
    every n, which on 50 hosts means 50 ILP pricings per layer).
    """
    shapes = [s for s in cluster.enumerate_submesh_shapes()
              if s[0] == 1 and math.prod(s) % device_unit(cluster) == 0]
    hosts = cluster.num_hosts
    keep = {n for n in range(2, min(hosts, 8) + 1)}
    keep |= {2**i for i in range(hosts.bit_length()) if 2**i <= hosts}
    keep |= {d for d in range(2, hosts + 1) if hosts % d == 0}
    shapes += [(n, cluster.devices_per_host) for n in sorted(keep) if n >= 2]
    return shapes


def candidate_views(submesh: tuple[int, int]) -> list[tuple[int, ...]]:
    """`assignment.logical_views` and, for a submesh within one host, ``(1, n)``: tensor
    parallelism over the host for micro-batches of any size (its first axis splits none;
    `MicroBatchCounts` offers a 1-D ``(n,)`` view only at micro-batches ``n`` divides).

    Example:
        >>> candidate_views((1, 8)), candidate_views((2, 8))
        ([(8,), (4, 2), (2, 4), (1, 8)], [(16,), (8, 2), (4, 4), (2, 8)])
    """
    views = sp.logical_views(submesh)
    n = math.prod(submesh)
    return views + [(1, n)] if submesh[0] == 1 and n > 1 else views


def _expand(values, num_blocks: int) -> list:
    """Layer values of the traced 3-block model -> L blocks: first, middle x (L-2), last."""
    if num_blocks <= len(values):
        return list(values[:num_blocks])
    return [values[0]] + [values[1]] * (num_blocks - 2) + [values[-1]]


def _group(prices, groups: int):
    """At most ``groups`` contiguous groups of layer prices (for the stage DP's size)."""
    bounds = np.linspace(0, len(prices), groups + 1).round().astype(int)
    return [pricing.combine_prices(prices[a:b]) for a, b in zip(bounds, bounds[1:])], bounds


# consecutive micro-batch counts a search tries differ by at least this factor
COUNT_STEP = 1.25


def _micro_batch_counts(preset: ModelPreset, cluster: ClusterSpec,
                        given: int | None) -> MicroBatchCounts:
    """The counts a search tries: ``given``, else the divisors of the batch up to 256 or the
    default (`_default_micro_batches`) if larger, thinned so that each is at least
    `COUNT_STEP` times the one before, with the default and, for every candidate submesh of
    n hosts, ``batch / n`` kept: one sequence per replica of a stage there with tensor
    parallelism over each host (its view ``(n, devices_per_host)``), the micro-batch of the
    hand-written layouts, which the thinning may skip (2,160 on 15 hosts: 144).

    Example (a batch of 2,160 on one host of 8: default 30, the largest divisor up to 32):
        >>> from alpa_lite.cluster import get_cluster_preset
        >>> from alpa_lite.models.presets import custom_preset
        >>> gpt = custom_preset("gpt", hidden=64, num_layers=2, heads=2, vocab=128,
        ...                     seq_len=16, batch=2160)
        >>> _micro_batch_counts(gpt, get_cluster_preset("a100-80gb-8x"), None).options
        (1, 2, 3, 4, 5, 8, 10, 15, 20, 27, 30, 36, 45, 60, 80, 108, 135, 180, 240)
    """
    batch = preset.default_batch_size
    if given:
        return MicroBatchCounts.exactly(batch, given)
    default = _default_micro_batches(preset, cluster)
    largest = max(default, 256)
    options = [1]
    for k in range(2, largest + 1):
        if batch % k == 0 and k >= options[-1] * COUNT_STEP:
            options.append(k)
    per_replica = {batch // n for n, _ in candidate_submeshes(cluster)
                   if batch % n == 0 and batch // n <= largest}
    return MicroBatchCounts(batch, default, tuple(sorted({*options, default, *per_replica})))


def _scaled(priced, counts: MicroBatchCounts, k: int):
    """Layer prices at k micro-batches of the candidates offered there, from each one's
    prices at its own count (`MicroBatchCounts`; see `pricing.scale_prices`): keeps the
    search to one pricing pass."""
    return {key: [pricing.scale_prices(p, counts.of(key) / k) for p in layers]
            for key, layers in priced.items() if counts.offers(key, k)}


def _remat_prices(preset, cluster, counts: MicroBatchCounts, remat: str):
    """(layer prices used, rematerialized prices offered to the DP or None) for a mode."""
    plain = None if remat == "layer" else _price_layers(preset, cluster, counts, False)
    remat_priced = None if remat == "off" else _price_layers(preset, cluster, counts, True)
    return (remat_priced, None) if plain is None else (plain, remat_priced)


def _lean_prices(preset, cluster, counts: MicroBatchCounts, remat: str,
                 only: frozenset | None = None) -> dict:
    """The memory-lean tables of `_remat_prices`' two (on the candidates ``only``, None:
    all), for `pricing.solve_stages`' ``lean_priced``: ``(False, level)`` for the first,
    ``(True, level)`` for the second."""
    flags = _REMAT_FLAGS[remat]
    return {(bool(position), level): table for position, remat_layer in enumerate(flags)
            for level, table in _price_lean_layers(preset, cluster, counts, remat_layer,
                                                   only).items()}


def _simulate_pipeline(preset, cluster, num_micro_batches, remat="off",
                       schedule="auto") -> ParallelPlan:
    """The stage DP at every micro-batch count. The fastest plan regardless of memory is
    solved at each count first; the counts are then solved within the budget from the
    fastest of those up, and a count whose fastest plan cannot beat the best plan so far
    under any schedule (`_cannot_beat`) is skipped. Memory-saving plans are priced and
    offered only when the budget costs time (`pricing.memory_binds`), in the steps of
    `_memory_step`."""
    counts = _micro_batch_counts(preset, cluster, num_micro_batches)
    flags = _REMAT_FLAGS[remat]
    priced0 = _price_layers(preset, cluster, counts, flags[0])
    flops = _block_flops(preset, cluster, counts.default, remat == "layer")

    def dp_at(k: int, remat0=None, lean0=None) -> _DPInput:
        lean = None if lean0 is None else {
            key: _scaled(table, counts, k) for key, table in lean0.items()}
        return _dp_input(preset, cluster, _scaled(priced0, counts, k), k,
                         None if remat0 is None else _scaled(remat0, counts, k), lean,
                         schedule)

    free = {}  # per count: (its DP input, the fastest plan regardless of memory)
    for k in counts.options:
        dp = dp_at(k)
        try:
            free[k] = (dp, dp.solve(memory_budget_bytes=None))
        except InfeasiblePlanError:  # the candidates offered at k form no pipeline
            continue
    if not free:
        raise InfeasiblePlanError(
            f"No pipeline of {preset.name} on {cluster.num_devices} devices exists at any "
            f"micro-batch count tried ({list(counts.options)}). Use a model with more layers, "
            "fewer devices or a larger batch.",
            budget_bytes=cluster.memory_per_device_bytes, min_bytes=math.nan)
    free_s = {k: solution.assignment.predicted_latency_s for k, (_, solution) in free.items()}
    order = sorted(free, key=lambda k: (free_s[k], -k))
    best, extra, bound_s = None, None, math.inf  # bound_s: the least DP latency that fits
    used = set()  # the candidates of the pipelines solved
    step = "plain"
    while True:
        for k in order:
            dp, fastest = free[k] if extra is None else (dp_at(k, *extra), None)
            if best is not None and _cannot_beat(best, free_s[k], k, dp):
                continue
            result, within_s = _pipeline_for(preset, cluster, dp, k, fastest, flops=flops,
                                             remat_layer=remat == "layer", schedule=schedule)
            bound_s = min(bound_s, within_s)
            used |= {(tuple(st.submesh), tuple(st.logical_mesh)) for st in result.stages}
            key = (not result.extra.fits_memory, result.predicted_step_time_s, k)
            if best is None or key < best[0]:
                best = (key, result)
        if not memory_binds(math.isfinite(bound_s), bound_s, min(free_s.values())):
            break
        # the budget costs time (or nothing fits): only then can memory-saving plans win, so
        # only then are they priced, each step costing more than the one before
        if step == "plain":
            plain_fits = math.isfinite(bound_s)  # some plain pipeline fits the budget
        step = _memory_step(step, remat == "auto", math.isfinite(bound_s))
        if step is None:
            break
        used |= {option for _, solution in free.values() for option in zip(
            map(tuple, solution.assignment.submesh_shapes),
            map(tuple, solution.assignment.logical_shapes))}
        # a plain pipeline that fits is refined on its own candidates; when none fits, one
        # may need another view of the same submeshes (GPT-39B on V100-16GB: a 1-D view)
        on_used = frozenset(used) if plain_fits else frozenset(
            (shape, view) for shape in {shape for shape, _ in used}
            for view in candidate_views(shape))
        if step == "lean on used" and 2 * len(on_used) >= sum(
                len(candidate_views(shape)) for shape in candidate_submeshes(cluster)):
            step = "lean on all"  # hardly cheaper: a second pricing would cost more
        # rematerialized layers: on every candidate, except where a plain pipeline that
        # fits is refined (like the lean plans: on its own candidates)
        remat_on = on_used if step == "lean on used" and plain_fits else None
        extra = (_price_layers(preset, cluster, counts, True, None, remat_on)
                 if remat == "auto" else None,
                 None if step == "remat" else _lean_prices(
                     preset, cluster, counts, remat,
                     on_used if step == "lean on used" else None))
    return _with_info(best[1], priced_at_micro_batches=counts.default,
                      lean_offered=extra is not None and extra[1] is not None)


def _memory_step(step: str, remat_auto: bool, fits: bool) -> str | None:
    """The pipeline search's next memory-saving step after ``step``, when the budget still
    costs time (None: no more):

    - ``"remat"``: rematerialized layers (remat "auto" only), alone, when nothing fits;
    - ``"lean on used"``: with them, the memory-lean layer plans on the candidates of the
      pipelines solved so far (with and without the budget), and when a plain pipeline
      fits (so step "remat" did not run) the rematerialized layers only there too; when no
      plain pipeline fits, on their submeshes in every view;
    - ``"lean on all"``: the same on every candidate, when still nothing fits (or at once
      when the used candidates are half of all).

        >>> _memory_step("plain", True, False), _memory_step("plain", True, True)
        ('remat', 'lean on used')
        >>> _memory_step("lean on used", True, False), _memory_step("lean on used", True, True)
        ('lean on all', None)
    """
    if step == "plain" and remat_auto and not fits:
        return "remat"
    if step in ("plain", "remat"):
        return "lean on used"
    if step == "lean on used" and not fits:
        return "lean on all"
    return None


def _cannot_beat(best, free_s: float, k: int, dp) -> bool:
    """Whether no plan at ``k`` micro-batches can beat the fitting ``best``: any schedule
    runs the slowest stage ``k`` times, at least ``k / (k + S - 1)`` of the 1F1B step of its
    stages (S stages at most), which is at least the fastest 1F1B step ``free_s``."""
    (overflows, best_s, _), _ = best
    most_stages = min(dp.groups, dp.units)
    return not overflows and free_s * k / (k + most_stages - 1) >= best_s


def dp_layer_count(blocks: int, num_units: int) -> int:
    """How many layers the stage DP sees for a model of ``blocks`` identical blocks: all of
    them when a pipeline could hold them one per stage (each stage takes a unit of devices
    at least: `device_unit`), else ``max(MAX_DP_LAYERS, units)`` groups: with more blocks
    than units a stage holds several blocks anyway, and the groups are at most one block
    apart in size.

    Example:
        >>> dp_layer_count(40, 200), dp_layer_count(128, 8), dp_layer_count(1024, 128)
        (40, 32, 128)
    """
    return min(blocks, max(MAX_DP_LAYERS, num_units))


def _stage_link(cluster: ClusterSpec) -> tuple[float, float]:
    return stage_link(cluster, cluster.devices_per_host, cluster.num_devices)


def _shared(cluster: ClusterSpec) -> int | None:
    """Devices per host when a host's devices share compute (`pricing.shared_stage_hosts`)."""
    return cluster.devices_per_host if cluster.shared_host_compute else None


@dataclasses.dataclass(frozen=True)
class _DPInput:
    """The stage DP's tables at one micro-batch count: ``solve(memory_budget_bytes=...)``
    (`pricing.solve_stages`), the layer prices per (remat, lean level) variant, the meshes,
    the DP layers' first blocks (``bounds``), how many DP layers (``groups``) and device
    units (``units``) there are."""

    solve: Callable
    variants: dict
    meshes: dict
    bounds: np.ndarray
    groups: int
    units: int


def _dp_input(preset, cluster, priced, k, remat_priced, lean_priced, schedule) -> _DPInput:
    """The L-block model's layer prices grouped into DP layers (`dp_layer_count`)."""
    blocks, unit = _num_blocks(preset), device_unit(cluster)
    groups = dp_layer_count(blocks, cluster.num_devices // unit)
    grouped, bounds = {}, None
    for key, layers in priced.items():
        grouped[key], bounds = _group(_expand(layers, blocks), groups)

    def group(table):
        return None if table is None else {
            key: _group(_expand(layers, blocks), groups)[0] for key, layers in table.items()}

    meshes = {key: cluster.logical_mesh(*key) for key in grouped}
    remat_grouped = group(remat_priced)
    lean_grouped = None if lean_priced is None else {
        key: group(table) for key, table in lean_priced.items()}
    solve = functools.partial(pricing.solve_stages, grouped, meshes,
                              num_devices=cluster.num_devices, k=k,
                              schedule="gpipe" if schedule == "gpipe" else "1f1b",
                              link=_stage_link(cluster), remat_priced=remat_grouped,
                              lean_priced=lean_grouped, shared_compute_per_host=_shared(cluster),
                              device_unit=unit)
    variants = {(False, 0.0): grouped, (True, 0.0): remat_grouped, **{
        (bool(remat), float(level)): table
        for (remat, level), table in (lean_grouped or {}).items()}}
    return _DPInput(solve, variants, meshes, bounds, groups, cluster.num_devices // unit)


def _pipeline_for(preset, cluster, dp: _DPInput, k: int, free, *, flops,
                  remat_layer: bool = False, schedule: str = "auto"
                  ) -> tuple[ParallelPlan, float]:
    """The stage DP's best pipeline at ``k`` micro-batches: the fastest within the memory
    budget, else the fastest (``free``: the DP's plan without the budget, when solved); and
    the DP's latency within the budget (inf when nothing fits)."""
    budget = cluster.memory_per_device_bytes
    fits, solution = True, free
    if free is None or max(st.memory_bytes for st in free.price.stages) > budget:
        try:
            solution = dp.solve(memory_budget_bytes=budget)
        except InfeasiblePlanError:
            # Report the fastest plan and how much memory it would need, rather than nothing.
            fits = False
            solution = free or dp.solve(memory_budget_bytes=None)
    chosen = _choose_schedule(solution.assignment, dp.variants, dp.meshes, cluster, k, schedule)
    stages = _stage_records(solution.assignment, chosen, dp.bounds, flops, remat_layer)
    peak = max(st.peak_memory_bytes for st in stages)
    breakdown = _pipeline_breakdown(preset, cluster, k, chosen.price,
                                    [st.layers for st in stages], [st.remat for st in stages])
    info = SimulationInfo("auto", chosen.price.step_time_s, peak,
                          fits_memory=fits and peak <= budget, dp_layers=dp.groups,
                          breakdown=breakdown, schedule=chosen.schedule,
                          virtual_stages=chosen.virtual_stages, runner_up=chosen.runner_up)
    return _simulated(k, info, stages), (solution.assignment.predicted_latency_s if fits
                                         else math.inf)


def _choose_schedule(assignment, variants, meshes, cluster, k: int, schedule: str):
    """`schedule_choice.choose_schedule` over the DP's stages: each stage's layer prices are
    those of its (remat, lean) variant on its (submesh, view)."""
    def price_of(s: int, layer: int):
        variant = (bool(assignment.remat[s]) if assignment.remat else False,
                   float(assignment.lean[s]) if assignment.lean else 0.0)
        option = (tuple(assignment.submesh_shapes[s]), tuple(assignment.logical_shapes[s]))
        return variants[variant][option][layer]

    return choose_schedule(schedule, None, assignment, price_of,
                           [meshes[(tuple(a), tuple(b))] for a, b in zip(
                               assignment.submesh_shapes, assignment.logical_shapes)],
                           _stage_link(cluster), k, cluster.memory_per_device_bytes,
                           pricing.shared_stage_hosts(assignment.submesh_shapes,
                                                      _shared(cluster)))


def _stage_records(assignment, chosen, bounds, flops, remat_layer: bool) -> list[StagePlan]:
    """The DP's stages, run with the ``chosen`` schedule (`ScheduleChoice`), as `StagePlan`s
    over blocks (``bounds``: the DP layers' first blocks)."""
    n = assignment.num_stages
    blocks = [[b for g, st in enumerate(chosen.layer_to_stage) if st == s
               for b in range(int(bounds[g]), int(bounds[g + 1]))] for s in range(n)]
    remat = [remat_layer or (bool(assignment.remat[s]) if assignment.remat else False)
             for s in range(n)]
    lean = [float(assignment.lean[s]) if assignment.lean else 0.0 for s in range(n)]
    return _span_records(chosen.price, blocks, flops, assignment.submesh_shapes,
                         assignment.logical_shapes, remat, lean)


def _span_records(price, blocks, flops, submeshes, views, remat, lean=None) -> list[StagePlan]:
    """`StagePlan`s of a priced pipeline whose stage ``s`` holds ``blocks[s]``; time per
    micro-batch split into forward and backward by the blocks' flops."""
    stages = []
    for s, (stage, held) in enumerate(zip(price.stages, blocks)):
        forward = sum(flops[b][0] for b in held)
        total = sum(flops[b][1] for b in held)
        share = forward / total if total > 0 else 0.5
        stages.append(StagePlan(
            stage=s, layers=tuple(held), submesh=tuple(submeshes[s]),
            logical_mesh=tuple(views[s]), forward_s=stage.micro_batch_s * share,
            backward_s=stage.micro_batch_s * (1 - share), grad_sync_s=stage.grad_sync_s,
            apply_s=stage.apply_s, peak_memory_bytes=stage.memory_bytes, plan=None,
            remat=bool(remat[s]), lean=float(lean[s]) if lean else 0.0))
    return stages


def _pipeline_breakdown(preset, cluster, k: int, price, blocks, remat):
    """`explain.pipeline_breakdown` of a priced pipeline whose stage ``s`` holds
    ``blocks[s]``; a rematerialized stage's recomputed share is its blocks' forward flops.
    Shares and state per parameter do not depend on the micro-batch size, so they come
    from one trace whatever ``k`` is."""
    traced = _default_micro_batches(preset, cluster)
    flops = _block_flops(preset, cluster, traced, True) if any(remat) else None
    shares = []
    for held, on in zip(blocks, remat):
        forward = sum(flops[b][0] for b in held) if on else 0.0
        total = sum(flops[b][1] for b in held) if on else 1.0
        shares.append(forward / total if total > 0 else 0.0)
    options = _layer_graph(preset, cluster, traced, any(remat))[2]
    return pipeline_breakdown(price, k, state_per_param=options.state_bytes_per_param_byte,
                              recompute_shares=shares)


@functools.lru_cache(maxsize=32)
def _block_flops(preset, cluster, k: int, remat_layer: bool,
                 megatron=None) -> list[tuple[float, float]]:
    """Per block of the L-block model: (forward flops, total flops), from the 3-layer trace."""
    graph, num_layers, _ = _layer_graph(preset, cluster, k, remat_layer, megatron)
    return _expand(pricing.layer_flops(graph, num_layers), _num_blocks(preset))


# --- single mesh (auto sharding, data parallel, ZeRO) ---------------------------------------


def _with_remat(preset: ModelPreset, remat_layer: bool) -> ModelPreset:
    """``preset`` with every block rematerialized (flax ``remat``) when ``remat_layer``."""
    if not remat_layer or not hasattr(preset.config, "remat"):
        return preset
    return dataclasses.replace(preset, config=dataclasses.replace(preset.config, remat=True))


def _plan_full_step(preset, cluster, policy, blocks, k, view):
    """``blocks`` blocks at micro-batch size planned for ``cluster`` by the planner
    `parallelize(...).plan(..., cluster=...)` uses: its intra-op plan, gradient-sync and
    update seconds (once per step), the update's compute seconds, and the per-micro-batch
    compute by class (`pricing.compute_class`, operators before the gradient boundary)."""
    small = _micro_batch_preset(preset, k, blocks)
    work = build_workload(small, abstract=True)
    method = _METHODS[policy](mesh_shape=tuple(view), share_repeated_layers=True)
    planned = plan_single_mesh(work.train_step, (work.state, work.batch), method, StepSpec(),
                               cluster=cluster, simulate=True)
    plan, graph = planned.plan, planned.trace.graph
    boundary = next((n.index for n in graph.nodes if n.name == "grad_boundary"), math.inf)
    by_class: dict[str, float] = {}
    for d in plan.sharding.nodes:
        if d.index < boundary:
            name = pricing.compute_class(graph.nodes[d.index].primitive)
            by_class[name] = by_class.get(name, 0.0) + d.compute_s
    update_compute = sum(d.compute_s for d in plan.sharding.nodes if d.index > boundary)
    return (plan.sharding, plan.extra.grad_sync_s, plan.extra.apply_s, update_compute,
            by_class)


def _simulate_single_mesh(preset, cluster, policy, num_micro_batches,
                          remat: str = "off") -> ParallelPlan:
    """The single-mesh plan at ``num_micro_batches``; with ``remat="auto"`` the faster of
    plain and rematerialized blocks that fits memory. Without a micro-batch count, the
    fewest micro-batches (1, 2, 4, ...: gradient accumulation, at least one sequence per
    device each) with which a plan fits, else the lightest."""
    n, batch = cluster.num_devices, preset.default_batch_size
    counts = [num_micro_batches] if num_micro_batches else [
        k for k in (2**i for i in range(batch.bit_length())) if batch % k == 0
        and (batch // k) % n == 0] or [1]
    best = None
    for remat_layer in _REMAT_FLAGS[remat]:
        plan = _fewest_micro_batches(preset, cluster, policy, counts, remat_layer)
        key = (not plan.extra.fits_memory, plan.extra.predicted_step_time_s
               if plan.extra.fits_memory else plan.extra.memory_per_device_bytes)
        if best is None or key < best[0]:
            best = (key, plan)
        if plan.extra.fits_memory:
            break  # more micro-batches cost less than recomputing every forward
    plan = best[1]
    size, rest = divmod(batch, plan.num_micro_batches * n)
    method = {v: k for k, v in _POLICIES.items()}[policy]
    named = None if rest or method == "shard" else Layout(
        method=method, dp=n, micro_batch_size=size,
        remat="layer" if plan.extra.remat_layers else "off").to_dict()
    return _with_info(plan, layout=named)


def _fewest_micro_batches(preset, cluster, policy, counts, remat_layer: bool) -> ParallelPlan:
    """The single-mesh plan at the fewest of ``counts`` micro-batches that fits memory, else
    the lightest tried. The memory at the first two counts, ``state + activations / k``,
    predicts the count to try next, so a search plans three or four counts, not all."""
    def plan_at(k: int) -> ParallelPlan:
        plan = _single_mesh_plan(_with_remat(preset, remat_layer), cluster, policy, k,
                                 remat_layer)
        return _with_info(plan, remat_layers=remat_layer)

    tried = [plan_at(counts[0])]
    if len(counts) > 1 and not tried[0].extra.fits_memory:
        tried.append(plan_at(counts[1]))
        (k1, m1), (k2, m2) = ((p.num_micro_batches, p.extra.memory_per_device_bytes)
                              for p in tried)
        activations = (m1 - m2) / (1 / k1 - 1 / k2)
        state = m1 - activations / k1
        rest = [k for k in counts[2:] if activations > 0
                and state + activations / k <= cluster.memory_per_device_bytes]
        while rest and not tried[-1].extra.fits_memory:
            tried.append(plan_at(rest.pop(0)))
    fitting = [p for p in tried if p.extra.fits_memory]
    return fitting[0] if fitting else min(tried, key=lambda p: p.extra.memory_per_device_bytes)


def _single_mesh_plan(preset, cluster, policy, k: int, remat_layer: bool) -> ParallelPlan:
    """The single-mesh plan of the L-block model: planned with 2 and 3 blocks, time, memory
    and the breakdown's parts extrapolated linearly to L blocks."""
    blocks = _num_blocks(preset)
    views = [(cluster.num_devices,)]
    if policy is SpecPolicy.AUTO and cluster.num_hosts > 1:
        views.append((cluster.num_hosts, cluster.devices_per_host))
    best = None
    for view in views:
        priced = [_plan_full_step(preset, cluster, policy, b, k, view)
                  for b in ((2, 3) if blocks > 3 else (blocks,))]
        extra = blocks - 2 if len(priced) == 2 else 0

        def at_l_blocks(f):
            return f(priced[0]) + (extra * (f(priced[1]) - f(priced[0])) if extra else 0.0)

        comm, sync, update, compute, memory, update_compute = (at_l_blocks(f) for f in (
            lambda p: p[0].objective, lambda p: p[1], lambda p: p[2],
            lambda p: p[0].compute_s, lambda p: p[0].peak_memory_bytes, lambda p: p[3]))
        step = single_mesh_step_time_s(compute, comm, sync + update, k)
        if best is None or step < best[0]:
            by_class = [(name, at_l_blocks(lambda p, n=name: p[4].get(n, 0.0)))
                        for name in sorted(set(priced[-1][4]) | set(priced[0][4]))]
            breakdown = single_mesh_breakdown(
                step, k, by_class, comm - sync - (update - update_compute), sync, update, 0.0,
                _forward_share(preset, cluster, k) if remat_layer else 0.0, memory)
            best = (step, memory, view, priced[0][0].solver, breakdown)
    step, memory, view, solver, breakdown = best
    return _simulated(k, SimulationInfo("", step, memory, logical_mesh=tuple(view),
                                        fits_memory=memory <= cluster.memory_per_device_bytes,
                                        ilp_variables=solver["num_variables"],
                                        ilp_status=solver["status"], breakdown=breakdown))


def _forward_share(preset, cluster, k: int) -> float:
    """The recomputed forward's share of a rematerialized block's flops, ``f / (f + t)``
    from the plain block's forward ``f`` and forward + backward ``t`` flops."""
    plain = dataclasses.replace(preset, config=dataclasses.replace(preset.config, remat=False))
    forward, total = _block_flops(plain, cluster, k, False)[min(1, _num_blocks(preset) - 1)]
    return forward / (forward + total) if total > 0 else 0.0


# --- named layouts ---------------------------------------------------------------------------


def _single_mesh_layout(preset, cluster, layout: Layout) -> ParallelPlan:
    """dp / ZeRO as named: ``micro_batch_size`` sequences per device and micro-batch
    (gradient accumulation over ``batch / (devices * size)`` micro-batches)."""
    n, batch = cluster.num_devices, preset.default_batch_size
    layout.data_parallel(n)
    size = layout.micro_batch_size or batch // n
    if batch % (n * size):
        raise InvalidConfigError(
            f"Micro-batch size {size} on {n} devices needs a batch that is a multiple of "
            f"{n * size}; the batch is {batch}. Choose --micro-batch-size dividing "
            f"{batch // n if batch % n == 0 else batch} or another --batch-size.")
    return _simulate_single_mesh(preset, cluster, _POLICIES[layout.method], batch // (n * size),
                                 layout.remat)


def _megatron_layout(preset, cluster, layout: Layout) -> ParallelPlan:
    """Megatron-LM's t x p x d as named: ``pp`` stages of ``blocks / pp`` blocks (the first
    stages take one more when they do not divide), each on ``tp * dp`` devices seen as a
    ``(dp, tp)`` mesh with Megatron's tensor parallelism; ``batch / (dp * b)`` micro-batches
    of ``dp * b`` sequences. Without a micro-batch size, the fastest of 1, 2, 4, 8 that fits;
    with ``remat="auto"``, the faster of off and layer that fits."""
    n, per_host = cluster.num_devices, cluster.devices_per_host
    dp, tp, pp = layout.data_parallel(n), layout.tp, layout.pp
    blocks, batch = _num_blocks(preset), preset.default_batch_size
    if per_host % tp:
        raise InvalidConfigError(
            f"Tensor parallelism runs within a host: tp={tp} must divide the "
            f"{per_host} devices per host. Use tp in "
            f"{[t for t in range(1, per_host + 1) if per_host % t == 0]}.")
    if pp > blocks:
        raise InvalidConfigError(
            f"pp={pp} stages need at least {pp} blocks; the model has {blocks}.")
    sizes = ([layout.micro_batch_size] if layout.micro_batch_size else
             [b for b in (1, 2, 4, 8) if batch % (dp * b) == 0])
    if not sizes or batch % (dp * sizes[0]):
        raise InvalidConfigError(
            f"The batch of {batch} does not split into micro-batches of "
            f"{layout.micro_batch_size or 1} sequences on each of dp={dp} replicas. Use a "
            f"--batch-size that is a multiple of {dp * (layout.micro_batch_size or 1)}.")
    per_stage = tp * dp
    shape = (1, per_stage) if per_stage <= per_host else (per_stage // per_host, per_host)
    candidate = (shape, (dp, tp))
    mesh = cluster.logical_mesh(shape, (dp, tp))
    if layout.chunks > 1:  # stage s holds chunks s, s + pp, ... of blocks / (pp v) blocks
        if blocks < pp * layout.chunks:
            raise InvalidConfigError(
                f"pp={pp} stages of {layout.chunks} interleaved chunks need at least "
                f"{pp * layout.chunks} blocks; the model has {blocks}.")
        owner = interleaved_layers([1.0] * blocks, pp, layout.chunks)
        bounds = [np.array([b for b in range(blocks) if owner[b] == s]) for s in range(pp)]
    else:
        bounds = np.array_split(np.arange(blocks), pp)
    best = None
    for size, remat_layer in itertools.product(
            sizes, _REMAT_FLAGS[layout.remat]):
        if remat_layer and layout.remat == "auto" and best is not None and (
                best[1].extra.layout["micro_batch_size"] == size and best[1].extra.fits_memory):
            continue  # recomputing only adds time to a layout that fits
        k = batch // (dp * size)
        if layout.chunks > 1 and k % pp:
            continue  # interleaving needs the micro-batches to be a multiple of the stages
        exact = MicroBatchCounts.exactly(batch, k)
        layers = _expand(_price_layers(preset, cluster, exact, remat_layer, candidate)[candidate],
                         blocks)
        spans = [[layers[int(b)] for b in held] for held in bounds]
        price = pricing.price_pipeline(spans, [mesh] * pp, _stage_link(cluster), k,
                                       layout.schedule,
                                       pricing.shared_stage_hosts([shape] * pp, _shared(cluster)),
                                       layout.chunks, [remat_layer] * pp)
        memory = max(st.memory_bytes for st in price.stages)
        fits = memory <= cluster.memory_per_device_bytes
        key = (not fits, price.step_time_s)
        if best is None or key < best[0]:
            named = dataclasses.replace(layout, dp=dp, micro_batch_size=size,
                                        remat="layer" if remat_layer else "off")
            flops = _block_flops(preset, cluster, k, remat_layer, candidate)
            ranges = [[int(x) for x in b] for b in bounds]
            stages = _span_records(price, ranges, flops, [shape] * pp, [(dp, tp)] * pp,
                                   [remat_layer] * pp)
            breakdown = _pipeline_breakdown(preset, cluster, k, price, ranges,
                                            [remat_layer] * pp)
            best = (key, _simulated(k, SimulationInfo(
                "", price.step_time_s, memory, fits_memory=fits, grid=(dp, tp, pp),
                remat_layers=remat_layer, layout=named.to_dict(), breakdown=breakdown,
                schedule=layout.schedule, virtual_stages=layout.chunks),
                stages))
    if best is None:
        raise InvalidConfigError(
            f"The interleaved schedule needs the micro-batch count (batch {batch} / (dp={dp} x "
            f"micro-batch size)) to be a multiple of pp={pp}; no micro-batch size in {sizes} "
            "gives one. Choose --micro-batch-size or --batch-size accordingly, or --schedule "
            "1f1b.")
    return best[1]


# --- Megatron-style 3-D grid -----------------------------------------------------------------


def _simulate_megatron(preset, cluster, num_micro_batches, remat="off") -> ParallelPlan:
    """Best (dp, tp, pp, micro-batches) on a grid: uniform stages, a (dp, tp) mesh per stage;
    with ``remat="auto"`` each layout is tried with and without rematerialization."""
    counts = _micro_batch_counts(preset, cluster, num_micro_batches)
    plain0, remat0 = _remat_prices(preset, cluster, counts, remat)
    variants = [(plain0, remat == "layer", 0.0)] + (
        [] if remat0 is None else [(remat0, True, 0.0)])
    best = _best_grid_layout(preset, cluster, counts, variants, None)
    if best is not None and not best[1].extra.fits_memory:
        # the layers' memory-lean plans only when nothing else fits
        remat_of = (remat == "layer", True)
        variants = [(table, remat_of[position], level) for (position, level), table
                    in _lean_prices(preset, cluster, counts, remat).items()]
        best = _best_grid_layout(preset, cluster, counts, variants, best)
    if best is None:
        raise InfeasiblePlanError("No Megatron-style (dp, tp, pp) layout exists for this "
                                  "cluster.", budget_bytes=cluster.memory_per_device_bytes,
                                  min_bytes=math.nan)
    return best[1]


def _best_grid_layout(preset, cluster, counts: MicroBatchCounts, variants, best):
    """The (fits, latency)-best of ``best`` and the grid's layouts priced with ``variants``
    (``(layer prices, rematerialized?, memory price level)``)."""
    blocks = _num_blocks(preset)
    n, per_host = cluster.num_devices, cluster.devices_per_host
    for (priced0, remat_on, lean), k in itertools.product(
            variants, counts.options):
        priced = _scaled(priced0, counts, k)
        for pp in [p for p in range(1, min(blocks, n) + 1) if n % p == 0 and blocks % p == 0]:
            per_stage = n // pp
            shape = (1, per_stage) if per_stage <= per_host else (per_stage // per_host, per_host)
            for view in sp.logical_views(shape):
                if (tuple(shape), view) not in priced:
                    continue
                layers = _expand(priced[(tuple(shape), view)], blocks)
                mesh = cluster.logical_mesh(tuple(shape), view)
                per = blocks // pp
                spans = [layers[s * per:(s + 1) * per] for s in range(pp)]
                price = pricing.price_pipeline(
                    spans, [mesh] * pp, _stage_link(cluster), k, "1f1b",
                    pricing.shared_stage_hosts([shape] * pp, _shared(cluster)))
                mem = max(st.memory_bytes for st in price.stages)
                latency = price.step_time_s
                fits = mem <= cluster.memory_per_device_bytes
                key = (not fits, latency)
                if best is None or key < best[0]:
                    dp, tp = (view[0], view[1]) if len(view) == 2 else (view[0], 1)
                    size, rest = divmod(preset.default_batch_size, k * dp)
                    named = None if rest or lean else Layout(
                        method="megatron", tp=tp, pp=pp, dp=dp, micro_batch_size=size,
                        remat="layer" if remat_on else "off").to_dict()
                    ranges = [list(range(s * per, (s + 1) * per)) for s in range(pp)]
                    best = (key, _simulated(k, SimulationInfo(
                        "", latency, mem, fits_memory=fits, grid=(dp, tp, pp),
                        remat_layers=remat_on, lean=lean, layout=named,
                        breakdown=_pipeline_breakdown(preset, cluster, k, price, ranges,
                                                      [remat_on] * pp))))
    return best
