"""Many processes on jax's own multi-controller runtime (`jax.distributed`).

Every process runs the same script: it calls `initialize()` first, then the same
`parallelize`d step with the same global values. Plans are made on process 0 and sent to the
others through the coordinator's key-value store (`share_plan`), so every process runs the same
programs; outputs are global `jax.Array`s, as `jax.jit` returns them.

Where the cluster comes from, in order (explicit arguments always win):

1. the variables ``alpa-lite launch`` sets (``ALPA_LITE_COORDINATOR``,
   ``ALPA_LITE_NUM_PROCESSES``, ``ALPA_LITE_PROCESS_ID``);
2. jax's own detection: Slurm (``srun``), Open MPI (``mpirun``), Kubernetes (with the
   ``kubernetes`` package), Cloud TPU;
3. nothing found: one process; `initialize` does nothing and says so in its result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from typing import Any, Sequence

from alpa_lite._jax_compat import backend_started, detected_cluster, distributed_state
from alpa_lite.errors import AlpaLiteError, InvalidConfigError

ENV_COORDINATOR = "ALPA_LITE_COORDINATOR"
ENV_NUM_PROCESSES = "ALPA_LITE_NUM_PROCESSES"
ENV_PROCESS_ID = "ALPA_LITE_PROCESS_ID"

_state: dict[str, Any] = {}


class PlanMismatchError(AlpaLiteError):
    """Processes disagree about what they are running (another step, other shapes)."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What `initialize` found.

    Attributes:
        process_id / num_processes: this process and how many there are.
        coordinator_address: ``host:port`` of the coordination service (None: one process).
        source: where the cluster came from: ``"arguments"``, ``"alpa-lite launch"``,
            ``"slurm"``, ``"ompi"``, ... or ``"single process"``.
    """

    process_id: int
    num_processes: int
    coordinator_address: str | None
    source: str


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               *, initialization_timeout: int = 300, heartbeat_timeout_seconds: int = 100,
               **kwargs) -> DistributedInfo:
    """Joins this process to the cluster (wraps `jax.distributed.initialize`).

    Call it once at the top of the script, before any jax computation. Calling it again is
    harmless (it returns the first result).

    Args:
        coordinator_address: ``host:port`` of process 0's coordination service.
        num_processes / process_id: the job's size and this process's index.
        local_device_ids: the local devices this process drives (default: all).
        initialization_timeout: seconds to wait for every process to join.
        heartbeat_timeout_seconds: a process silent this long is declared dead and the others
            fail (what ends a job whose process died when no launcher watches it).
        **kwargs: passed to `jax.distributed.initialize` (e.g. ``cluster_detection_method``).

    Returns:
        `DistributedInfo`.

    Raises:
        InvalidConfigError: jax's backend already started in this process (too late to
            join a cluster), or the launcher variables are malformed.
    """
    import jax

    if "info" in _state:
        return _state["info"]
    if jax.distributed.is_initialized():  # the user called jax.distributed.initialize
        _state["info"] = _info("jax.distributed")
        return _state["info"]
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    launcher = _launcher_variables()
    source = "arguments" if any(v is not None for v in explicit.values()) else None
    for name, value in launcher.items():
        if explicit[name] is None:
            explicit[name] = value
            source = source or "alpa-lite launch"
    source = source or detected_cluster()
    if source is None:
        info = DistributedInfo(0, 1, None, "single process")
        _state["info"] = info
        return info
    if backend_started():
        raise InvalidConfigError(
            "alpa_lite.distributed.initialize() must run before any jax computation, but jax's "
            "backend has already started in this process (something called jax.devices(), "
            "created an array or ran a jitted function). Call initialize() first, right after "
            "the imports.")
    jax.distributed.initialize(
        coordinator_address=explicit["coordinator_address"],
        num_processes=explicit["num_processes"], process_id=explicit["process_id"],
        local_device_ids=local_device_ids, initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds, **kwargs)
    _exit_on_uncaught_exception()
    _state["info"] = _info(source)
    return _state["info"]


def _info(source: str) -> DistributedInfo:
    state = distributed_state()
    return DistributedInfo(int(state.process_id), int(state.num_processes),
                           state.coordinator_address, source)


def _exit_on_uncaught_exception() -> None:
    """An uncaught exception ends this process at once (status 1, traceback printed).

    Without this, Python's exit runs jax's shutdown barrier, which waits up to
    ``shutdown_timeout_seconds`` (300 s) for the other processes, while they wait in a
    collective for this one: the job would hang instead of failing.
    """
    previous = sys.excepthook

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    sys.excepthook = hook


def _launcher_variables() -> dict[str, Any]:
    found = {}
    if os.environ.get(ENV_COORDINATOR):
        found["coordinator_address"] = os.environ[ENV_COORDINATOR]
    for name, key in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID)):
        text = os.environ.get(key)
        if text:
            try:
                found[name] = int(text)
            except ValueError:
                raise InvalidConfigError(
                    f"{key}={text!r} is not an integer; it should be set by alpa-lite launch "
                    f"(unset it, or set it to this process's {name.replace('_', ' ')}).") from None
    return found


# ------------------------------------------------------------------ global batches


def global_batch_from_local(local_batch, devices: Sequence | None = None):
    """Builds the global batch from each process's own shard of it.

    For data loaders that yield one shard per process: process ``p`` passes rows
    ``[p * n, (p + 1) * n)`` of the global batch (``n`` rows each, the same on every
    process); the result is a pytree of global `jax.Array`s of ``num_processes * n`` rows,
    split along dim 0 over ``devices`` (default: all), with each process's rows on its own
    devices. Pass the result to the parallelized step as the batch; alpa_lite moves it to the
    plan's sharding if that differs.

    Every process must call it with leaves of the same shapes and dtypes.
    """
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = list(jax.devices() if devices is None else devices)
    mesh = Mesh(np.array(devices), ("batch",))
    local_count = sum(d.process_index == jax.process_index() for d in devices)

    def build(leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim == 0:
            raise InvalidConfigError(
                "global_batch_from_local got a scalar leaf; every leaf needs a leading batch "
                "dimension (this process's rows). Pass scalars to the step separately.")
        if leaf.shape[0] % local_count:
            raise InvalidConfigError(
                f"This process's batch has {leaf.shape[0]} rows, which its {local_count} "
                "devices cannot split evenly. Make the per-process batch a multiple of the "
                "local device count.")
        sharding = NamedSharding(mesh, PartitionSpec("batch"))
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree_util.tree_map(build, local_batch)


def to_host(tree):
    """Every leaf as a numpy array holding the global value, on every process.

    Global arrays whose shards live on other processes are gathered (a collective: every
    process must call it with the same tree).
    """
    import jax

    from alpa_lite.emit.transfer import gather_to_hosts

    return jax.tree_util.tree_map(gather_to_hosts, tree)


# ------------------------------------------------------------------ one plan for all


def _tell(client, key: str, message: str) -> None:
    """Posts a rejection for process 0. Process 0 may read it and exit, closing the
    coordination service, before the post's reply arrives: that failure must not hide the
    rejection this process is about to raise."""
    try:
        client.key_value_set(key, message)
    except Exception:  # noqa: BLE001  (the caller raises the real error next)
        pass


def share_plan(make_plan_json, what: str, accept, *, timeout_s: float = 600.0) -> str:
    """Process 0 plans; every process runs process 0's plan.

    Process 0 calls ``make_plan_json()`` and publishes the JSON in the coordinator's
    key-value store; every other process calls ``accept(json)`` (which rebuilds the plan
    and checks it against its own trace) and reports back, and process 0 returns only when
    all accepted. ``what`` identifies the call being planned (function, argument
    signature): a process planning something else than process 0 at the same point, or
    rejecting its plan, makes every process fail with `PlanMismatchError` instead of
    deadlocking later in a collective. In one process this is just ``make_plan_json()``.
    """
    import jax

    if jax.process_count() == 1:
        return make_plan_json()
    client = distributed_state().client
    count = _state.get("plans", 0)
    _state["plans"] = count + 1
    key = f"alpa_lite/plan/{count}"
    digest = hashlib.sha256(what.encode()).hexdigest()[:16]
    if jax.process_index() == 0:
        try:
            text = make_plan_json()
        except Exception as err:  # tell the others instead of leaving them waiting
            client.key_value_set(key, f"error\n{digest}\n{type(err).__name__}: {err}")
            raise
        client.key_value_set(key, f"plan\n{digest}\n{text}")
        for other in range(1, jax.process_count()):  # each one checked what it got
            try:
                answer = client.blocking_key_value_get(f"{key}/ack/{other}",
                                                       int(timeout_s * 1000))
            except Exception as err:
                raise PlanMismatchError(
                    f"Process 0 waited {timeout_s:.0f} s for process {other} to accept plan "
                    f"number {count} and got no answer ({type(err).__name__}). Every process "
                    "must call the parallelized step the same number of times with the same "
                    f"shapes; is process {other} alive, or stuck elsewhere?") from None
            if answer != "ok":
                raise PlanMismatchError(f"Process {other} rejected process 0's plan: {answer}")
        return text
    try:
        value = client.blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as err:
        raise PlanMismatchError(
            f"Process {jax.process_index()} waited {timeout_s:.0f} s for process 0's plan "
            f"number {count} and got none ({type(err).__name__}). Every process must call the "
            "parallelized step the same number of times with the same shapes; is process 0 "
            "alive?") from None
    kind, their_digest, text = value.split("\n", 2)
    if kind == "error":
        raise AlpaLiteError(f"Process 0 failed to plan: {text}")
    ack = f"{key}/ack/{jax.process_index()}"
    if their_digest != digest:
        message = (
            f"Process {jax.process_index()} is planning a different call than process 0 at "
            f"plan number {count} (signature digest {digest} on process {jax.process_index()}, "
            f"{their_digest} on process 0): every process must run the same script with the "
            "same argument shapes and static values, in the same order. Running on would "
            "deadlock, so this stops here.")
        _tell(client, ack, message)
        raise PlanMismatchError(message)
    try:
        accept(text)
    except Exception as err:
        _tell(client, ack, f"{type(err).__name__}: {err}")
        raise
    client.key_value_set(ack, "ok")
    return text
