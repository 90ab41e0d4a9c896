"""`parallelize`: the decorator users call, and `ParallelizedFunction`, which caches plans."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import jax

from alpa_lite._jax_compat import without_mesh_context
from alpa_lite.config import PipeshardParallel, ShardParallel
from alpa_lite.distributed import share_plan
from alpa_lite.emit.executable import PlanMismatch
from alpa_lite.errors import InvalidConfigError
from alpa_lite.methods import build_executable, planner_for
from alpa_lite.plan import ParallelPlan
from alpa_lite.step import StepSpec, check_argnums
from alpa_lite.trace import abstract_signature


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def parallelize(fun: Callable | None = None, *, method: Any = None,
                static_argnums: int | Sequence[int] = (), donate_argnums: int | Sequence[int] = (),
                batch_argnums: int | Sequence[int] = (1,), cluster=None):
    """Parallelizes a JAX function (usually a train step) over devices.

    Works as ``@parallelize`` (all devices on one axis, automatic sharding) or
    ``@parallelize(method=...)``. The first call with new argument shapes traces, plans and
    compiles; later calls with the same shapes reuse the executable.

    Args:
        fun: the function, e.g. ``train_step(state, batch) -> (new_state, loss)``.
        method: `ShardParallel` (default), `DataParallel`, `Zero2Parallel`, `Zero3Parallel`
            or `PipeshardParallel`.
        static_argnums: positional arguments that are hashable Python values (as in jax.jit).
        donate_argnums: positional arguments whose buffers may be reused (as in jax.jit).
        batch_argnums: positional arguments holding the batch (split into micro-batches on
            dim 0).
        cluster: a `ClusterSpec` whose links, compute peaks and profile price the plans
            (e.g. ``ClusterSpec.from_devices(profile=ProfileDatabase.load("db.json"))``, from
            ``alpa-lite profile ... --out db.json``). Default: built-in per-platform numbers.

    Example:
        >>> import jax.numpy as jnp
        >>> step = parallelize(lambda w, x: jnp.sum(jnp.tanh(x @ w)), method=ShardParallel(
        ...     mesh_shape=(1,)))
        >>> float(step(jnp.ones((4, 4)), jnp.ones((2, 4)))) > 0
        True
    """
    if fun is None:
        return functools.partial(parallelize, method=method, static_argnums=static_argnums,
                                 donate_argnums=donate_argnums, batch_argnums=batch_argnums,
                                 cluster=cluster)
    method = ShardParallel() if method is None else method
    step = StepSpec(_as_tuple(static_argnums), _as_tuple(donate_argnums), _as_tuple(batch_argnums))
    return ParallelizedFunction(fun, method, step, cluster)


@dataclasses.dataclass
class _CacheEntry:
    """One argument signature's plan (`SingleMeshPlanned` / `PipelinePlanned`) and, once
    called, its executable."""

    planned: Any
    signature: tuple
    executable: Any = None


class ParallelizedFunction:
    """A parallelized function: call it, ``.plan(...)`` it or ``.lower(...)`` it.

    Calls dispatch like `jax.jit`: the executable of the last plan is tried first through
    jax's C++ path, and only a call with a new argument signature (shapes, dtypes, pytree
    structure, static values) or misplaced arguments takes the slower Python path that looks
    up (or makes) the plan for it.
    """

    def __init__(self, fun: Callable, method: Any, step: StepSpec, cluster=None):
        if not callable(fun):
            raise InvalidConfigError(f"parallelize needs a callable; got {type(fun).__name__}.")
        self.fun, self.method, self.step, self.cluster = fun, method, step, cluster
        self._cache: dict = {}
        self._loaded_plan: ParallelPlan | None = None
        self._last = None  # the executable of the last call (the fast path)
        self.num_plans = 0  # how many times planning ran (the cache's hit test)
        functools.update_wrapper(self, fun)

    def _key(self, args) -> tuple:
        check_argnums(args, self.step)
        return abstract_signature(args, self.step.static_argnums)

    def _compiled_plan(self, args, cluster=None) -> "_CacheEntry":
        key = self._key(args) + (cluster,)
        entry = self._cache.get(key)
        if entry is None:
            entry = _CacheEntry(self._make_plan(args, cluster), key[:-1])
            self.num_plans += 1
            self._cache[key] = entry
        return entry

    def _make_plan(self, args, cluster=None):
        if cluster is not None or jax.process_count() == 1:
            return self._plan_with(args, cluster, self._loaded_plan)
        # several processes: process 0 plans, the others run its plan (never a different one)
        made = {}

        def make() -> str:
            made["planned"] = self._plan_with(args, None, self._loaded_plan)
            return made["planned"].plan.to_json()

        leaves, tree = jax.tree_util.tree_flatten(tuple(args))
        shapes = [(getattr(x, "shape", None), str(getattr(x, "dtype", type(x)))) for x in leaves]
        what = re.sub(r" at 0x[0-9a-fA-F]+", "", (  # object addresses differ per process
            f"{getattr(self.fun, '__qualname__', self.fun)} {type(self.method).__name__} "
            f"{tree} {shapes}"))
        share_plan(make, what, accept=lambda text: made.setdefault(
            "planned", self._plan_with(args, None, ParallelPlan.from_json(text))))
        return made["planned"]

    def _plan_with(self, args, cluster, plan: ParallelPlan | None):
        """Plans with a loaded ``plan`` or by solving; ``cluster`` given = simulation (no
        devices), else executed on the local devices, priced with ``self.cluster``."""
        simulate = cluster is not None
        return planner_for(self.method)(self.fun, args, self.method, self.step,
                                        cluster=cluster if simulate else self.cluster,
                                        plan=plan, simulate=simulate)

    def use_plan(self, plan: ParallelPlan) -> "ParallelizedFunction":
        """Runs with ``plan`` (e.g. from `ParallelPlan.from_json`) instead of solving.

        The plan must belong to the same function and argument shapes; a mismatch raises
        `InvalidConfigError` when the function is next called.

        Raises:
            InvalidConfigError: a pipeline plan for a ShardParallel-family method, or the
                other way round.
        """
        pipeline_plan = plan.method == "PipeshardParallel"
        if pipeline_plan != isinstance(self.method, PipeshardParallel):
            raise InvalidConfigError(
                f"use_plan got a {plan.method} plan for a {type(self.method).__name__} "
                "function. Load the plan into a function parallelized with the method that "
                "made it.")
        self._loaded_plan = plan
        self._cache.clear()
        self._last = None
        return self

    def get_executable(self, *args):
        """The executable for these arguments (planned and compiled on first use)."""
        entry = self._compiled_plan(args)
        if entry.executable is None:
            entry.executable = build_executable(entry.planned, self.method, self.step,
                                                entry.signature)
        return entry.executable

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise InvalidConfigError(
                f"parallelized functions take positional arguments only; got keyword arguments "
                f"{sorted(kwargs)}. Pass them positionally (mark hashable ones with "
                "static_argnums).")
        last = self._last
        if last is not None:
            try:
                with without_mesh_context():  # the plan's meshes, not a caller's set_mesh
                    return last.call_unplaced(*args)
            except PlanMismatch:
                pass  # a new argument signature: the checked path below
        executable = self.get_executable(*args)
        self._last = executable
        with without_mesh_context():
            return executable(*args)

    def plan(self, *args, cluster=None) -> ParallelPlan:
        """The plan for these arguments (arrays or ShapeDtypeStructs), without running.

        Args:
            *args: the step's arguments, or `jax.ShapeDtypeStruct`s of them.
            cluster: a `ClusterSpec` to plan for instead of the local devices (simulation:
                no devices are used; the plan cannot be run here).
        """
        return self._compiled_plan(args, cluster).planned.plan

    def input_shardings(self, *args) -> tuple:
        """Where the plan for these arguments wants each of them (plans and compiles once).

        Use it to place a restored state, e.g. ``checkpoint.restore(directory, like=state,
        shardings=p.input_shardings(state, batch)[0])``, so the next step moves nothing.

        Args:
            *args: the step's arguments, or `jax.ShapeDtypeStruct`s of them.

        Returns:
            One entry per argument: a pytree of `jax.sharding.NamedSharding` matching it, or
            None for a static argument. For `PipeshardParallel` each leaf's sharding lies on
            the submesh of the stage that first reads it.

        Example:
            >>> import jax.numpy as jnp
            >>> p = parallelize(lambda w, x: jnp.sum(x @ w), method=ShardParallel(
            ...     mesh_shape=(1,)))
            >>> type(p.input_shardings(jnp.ones((4, 4)), jnp.ones((2, 4)))[0]).__name__
            'NamedSharding'
        """
        executable = self.get_executable(*args)
        static = set(self.step.static_argnums)
        dynamic = iter(executable.input_shardings)
        return tuple(None if i in static else next(dynamic) for i in range(len(args)))

    def lower(self, *args):
        """Lowers the parallel program (`.compile().as_text()` shows its collectives).

        Arguments may be arrays or `jax.ShapeDtypeStruct`s.
        """
        executable = self.get_executable(*args)
        with without_mesh_context():
            return executable.lower(*args)
