"""Layer pricing for simulation on every core.

A search prices each layer of a 3-layer trace on every candidate (submesh, view) with the
intra-op ILP; the candidates are independent, so `simulate` hands them to worker processes
when pricing them here would take long (`WORTH_WORKERS_S`). A worker re-traces the model from the
same recipe (preset, cluster, micro-batches, remat, Megatron candidate: all picklable) and
prices the candidates it is sent with `pricing.LayerPricer`; the ILP is deterministic, so
the table is the one a single process computes. Workers are spawned (a forked process
would inherit JAX's threads) and live for one `simulate` call.

A script that calls `simulate` without an ``if __name__ == "__main__":`` guard cannot start
spawned workers (Python re-runs the script in each); the pricing then runs in the calling
process, with a warning.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
import warnings
from typing import Iterator, Sequence

# pricing moves to the workers when what is left would take longer than this at the pace of
# the candidates priced so far: starting a worker (importing jax, tracing the model) takes
# a few seconds
WORTH_WORKERS_S = 10.0

_POOL: contextvars.ContextVar = contextvars.ContextVar("alpa_lite_search_pool", default=None)


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Pool:
    """A process pool started on first use."""

    def __init__(self, workers: int):
        self.workers, self.executor, self.broken = workers, None, False

    def get(self) -> concurrent.futures.ProcessPoolExecutor | None:
        if self.broken or self.workers < 2:
            return None
        if self.executor is None:
            self.executor = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_quiet)
        return self.executor

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def worker_pool(workers: int | None) -> Iterator[None]:
    """Within the block, `price_candidates` may use ``workers`` processes (None: one per
    core; 1: none)."""
    pool = _Pool(default_workers() if workers is None else workers)
    token = _POOL.set(pool)
    try:
        yield
    finally:
        _POOL.reset(token)
        pool.close()


def price_candidates(jobs: Sequence[tuple], levels: Sequence[float],
                     fastest: dict | None) -> Iterator[tuple]:
    """``(candidate, per-level layer prices)`` for each ``(recipe, candidate)`` of ``jobs`` in
    order (see `pricing.LayerPricer.price`; ``recipe``: the arguments of
    `simulate._layer_graph`). Priced here until the rest looks worth the worker pool
    (`WORTH_WORKERS_S` at the pace so far) when one is open."""
    def fastest_of(c):
        return None if fastest is None else fastest[(tuple(c[0]), tuple(c[1]))]

    pool = _POOL.get()
    start, done = time.perf_counter(), 0
    while done < len(jobs):
        pace = (time.perf_counter() - start) / done if done else 0.0
        if pool is not None and pace * (len(jobs) - done) > WORTH_WORKERS_S:
            executor = pool.get()
            if executor is not None:
                try:
                    futures = [executor.submit(_price_in_worker, recipe, c, tuple(levels),
                                               fastest_of(c)) for recipe, c in jobs[done:]]
                    for (_, c), future in zip(jobs[done:], futures):
                        result = future.result()
                        done += 1
                        yield c, result
                except concurrent.futures.process.BrokenProcessPool as error:
                    pool.broken = True
                    warnings.warn(
                        f"Layer pricing falls back to one process: its worker processes "
                        f"failed ({error}). A script that calls simulate() needs an "
                        f"`if __name__ == \"__main__\":` guard for them.", RuntimeWarning,
                        stacklevel=2)
                continue
        recipe, c = jobs[done]
        result = _price_in_worker(recipe, c, levels, fastest_of(c))
        done += 1
        yield c, result


def _quiet() -> None:
    """A worker's standard output goes nowhere (solvers print banners there); its errors
    still reach standard error. A worker ends when the search process does, however that
    ends: killed, its workers would otherwise wait on the pool's queue for ever (holding the
    caller's standard error open)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True,
                         name="alpa_lite-parent-watch").start()


def _exit_with(sentinel) -> None:
    multiprocessing.connection.wait([sentinel])  # ready once the parent has ended
    os._exit(1)


def _price_in_worker(recipe: tuple, candidate, levels, fastest):
    return _pricer(*recipe).price(candidate, levels, fastest)


# one per micro-batch count priced (`simulate.MicroBatchCounts.of`): a few dozen at most
@functools.lru_cache(maxsize=64)
def _pricer(*recipe):
    from alpa_lite.inter_op.pricing import LayerPricer
    from alpa_lite.simulate import _layer_graph

    graph, num_layers, options = _layer_graph(*recipe)
    return LayerPricer(graph, num_layers, recipe[1].logical_mesh, options)
