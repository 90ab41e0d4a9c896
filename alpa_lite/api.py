"""`parallelize`: the decorator users call, and `ParallelizedFunction`, which caches plans."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax

from alpa_lite.compile import (StepSpec, compile_pipeshard, compile_shard_parallel,
                               plan_pipeshard, plan_shard_parallel)
from alpa_lite.config import PipeshardParallel, ShardParallel
from alpa_lite.errors import InvalidConfigError
from alpa_lite.plan import ParallelPlan
from alpa_lite.trace import abstractify, split_static_args


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def parallelize(fun: Callable | None = None, *, method: Any = None,
                static_argnums: int | Sequence[int] = (), donate_argnums: int | Sequence[int] = (),
                batch_argnums: int | Sequence[int] = (1,)):
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

    Example:
        >>> import jax.numpy as jnp
        >>> step = parallelize(lambda w, x: jnp.sum(jnp.tanh(x @ w)), method=ShardParallel(
        ...     mesh_shape=(1,)))
        >>> float(step(jnp.ones((4, 4)), jnp.ones((2, 4)))) > 0
        True
    """
    if fun is None:
        return functools.partial(parallelize, method=method, static_argnums=static_argnums,
                                 donate_argnums=donate_argnums, batch_argnums=batch_argnums)
    method = ShardParallel() if method is None else method
    step = StepSpec(_as_tuple(static_argnums), _as_tuple(donate_argnums), _as_tuple(batch_argnums))
    return ParallelizedFunction(fun, method, step)


class ParallelizedFunction:
    """A parallelized function: call it, ``.plan(...)`` it or ``.lower(...)`` it."""

    def __init__(self, fun: Callable, method: Any, step: StepSpec):
        if not callable(fun):
            raise InvalidConfigError(f"parallelize needs a callable; got {type(fun).__name__}.")
        self.fun, self.method, self.step = fun, method, step
        self._cache: dict = {}
        self._loaded_plan: ParallelPlan | None = None
        self.num_plans = 0  # how many times planning ran (the cache's hit test)
        functools.update_wrapper(self, fun)

    def _key(self, args) -> tuple:
        dynamic, static, _ = split_static_args(args, self.step.static_argnums)
        leaves, tree = jax.tree_util.tree_flatten(tuple(dynamic))
        avals = tuple((tuple(a.shape), str(a.dtype)) for a in map(abstractify, leaves))
        return tree, avals, tuple(sorted(static.items(), key=lambda kv: kv[0]))

    def _compiled_plan(self, args, cluster=None):
        key = self._key(args) + (cluster,)
        entry = self._cache.get(key)
        if entry is None:
            entry = {"plan": self._make_plan(args, cluster)}
            self.num_plans += 1
            self._cache[key] = entry
        return entry

    def _make_plan(self, args, cluster=None):
        if isinstance(self.method, ShardParallel):
            return plan_shard_parallel(self.fun, args, self.method, self.step,
                                       plan=self._loaded_plan, cluster=cluster)
        if isinstance(self.method, PipeshardParallel):
            return plan_pipeshard(self.fun, args, self.method, self.step, cluster=cluster)
        raise InvalidConfigError(
            f"Unknown method {self.method!r}; use ShardParallel, DataParallel, Zero2Parallel, "
            "Zero3Parallel or PipeshardParallel.")

    def use_plan(self, plan: ParallelPlan) -> "ParallelizedFunction":
        """Runs with ``plan`` (e.g. from `ParallelPlan.from_json`) instead of solving.

        The plan must belong to the same function and argument shapes; a mismatch raises
        `InvalidConfigError` when the function is next called.
        """
        self._loaded_plan = plan
        self._cache.clear()
        return self

    def get_executable(self, *args):
        entry = self._compiled_plan(args)
        if "executable" not in entry:
            if isinstance(self.method, PipeshardParallel):
                entry["executable"] = compile_pipeshard(entry["plan"], self.method)
            else:
                entry["executable"] = compile_shard_parallel(entry["plan"], self.step)
        return entry["executable"]

    def __call__(self, *args):
        return self.get_executable(*args)(*args)

    def plan(self, *args, cluster=None) -> ParallelPlan:
        """The plan for these arguments (arrays or ShapeDtypeStructs), without running.

        Args:
            *args: the step's arguments, or `jax.ShapeDtypeStruct`s of them.
            cluster: a `ClusterSpec` to plan for instead of the local devices (simulation:
                no devices are used; the plan cannot be run here).
        """
        return self._compiled_plan(args, cluster)["plan"].plan

    def lower(self, *args):
        """Lowers the parallel program (`.compile().as_text()` shows its collectives)."""
        return self.get_executable(*args).lower(*args)
