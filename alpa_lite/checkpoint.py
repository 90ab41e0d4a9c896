"""Checkpoints of sharded train states, on orbax: save, restore (onto any plan), latest step.

Input: a pytree of `jax.Array`s (e.g. a `TrainState` returned by a parallelized step, whose
leaves may lie on several stage meshes) and a step number. Output: a step directory
``<directory>/<step>/`` holding the state (orbax's PyTree format: every process writes
only the shards it owns) and, when given, the `ParallelPlan` as JSON. Everything that makes
a save safe is orbax's: it writes into a temporary directory and renames it when the step is
complete (so a step is whole on disk or absent, also after a SIGKILL), it keeps the last N
steps, and its async mode returns once the arrays are copied to host memory.

`restore` reads into a ``like`` tree (arrays or `jax.ShapeDtypeStruct`s). With
``shardings`` (e.g. ``p.input_shardings(state, batch)[0]``) every array is placed where that
plan wants it and each process reads only the shards it needs, so a state saved under one
method or mesh resumes under another. This module checks what orbax does not: that the
directory holds a complete step, and that every leaf of ``like`` exists with the saved shape
and dtype (orbax would cast dtypes silently).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax

from alpa_lite import distributed
from alpa_lite.errors import AlpaLiteError
from alpa_lite.plan import ParallelPlan


def _orbax():
    """orbax.checkpoint, imported on first use: it is slow to import and, on some jax
    releases, warns at import time; `import alpa_lite` should do neither."""
    import orbax.checkpoint

    return orbax.checkpoint

_STATE = "state"
_PLAN = "plan"


class CheckpointError(AlpaLiteError, ValueError):
    """A checkpoint directory is missing, truncated or foreign, or does not fit ``like``."""


def _manager(directory: str | os.PathLike, *, max_to_keep: int | None = None,
             async_: bool = False, create: bool = False) -> Any:
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                           enable_async_checkpointing=async_)
    handlers = {_STATE: ocp.PyTreeCheckpointHandler(), _PLAN: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_handlers=handlers)


def _spans_all_processes(x: jax.Array) -> bool:
    return len({d.process_index for d in x.sharding.device_set}) == jax.process_count()


def _savable(state: Any) -> Any:
    """``state`` with every leaf that lives on the devices of only some processes (a pipeline
    stage on one host) gathered to a host array on every process: orbax writes global arrays
    shard by shard, but refuses arrays that are local to one process of several."""
    if jax.process_count() == 1:
        return state
    return jax.tree_util.tree_map(
        lambda x: distributed.to_host(x) if isinstance(x, jax.Array)
        and not _spans_all_processes(x) else x, state)


class Checkpointer:
    """Saves steps into one directory; the object a training loop keeps.

    Args:
        directory: where the steps go (created on the first save).
        max_to_keep: keep only the newest this many steps (None: keep all).
        async_: `save` returns once the arrays are on the host; the write finishes in the
            background, and `wait` (or the next `save`, or `close`) waits for it.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> with Checkpointer(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
        ...     for step in range(3):
        ...         ckpt.save({"w": jnp.full((2,), step)}, step)
        ...     ckpt.all_steps()
        [1, 2]
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None,
                 async_: bool = False):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise CheckpointError(f"max_to_keep must be a positive int or None; got "
                                  f"{max_to_keep!r}. Pass e.g. max_to_keep=3.")
        self.directory = Path(directory).absolute()
        self._manager = _manager(self.directory, max_to_keep=max_to_keep, async_=async_,
                                 create=True)

    def save(self, state: Any, step: int, *, plan: ParallelPlan | None = None) -> None:
        """Saves ``state`` (and ``plan``, as JSON) as ``step``; durable on return unless async.

        Raises:
            CheckpointError: ``step`` is not a non-negative int, or already saved.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"step must be a non-negative int; got {step!r}.")
        if step in self._manager.all_steps():
            raise CheckpointError(
                f"Step {step} is already saved in {self.directory}. Save under a new step "
                "number, or delete that step directory first.")
        items = {_STATE: _orbax().args.PyTreeSave(_savable(state))}
        if plan is not None:
            items[_PLAN] = _orbax().args.JsonSave(json.loads(plan.to_json()))
        self._manager.save(step, args=_orbax().args.Composite(**items))

    def wait(self) -> None:
        """Waits until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        """The complete steps in the directory, oldest first."""
        return sorted(self._manager.all_steps())

    def close(self) -> None:
        """Waits for pending saves and releases orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def save(directory: str | os.PathLike, state: Any, step: int, *,
         plan: ParallelPlan | None = None, max_to_keep: int | None = None,
         async_: bool = False) -> Checkpointer:
    """Saves ``state`` as ``step`` in ``directory``: whole on disk, or absent.

    Args:
        directory: the checkpoint directory (one subdirectory per step).
        state: a pytree of arrays, e.g. the `TrainState` a parallelized step returned.
        step: the step number.
        plan: the `ParallelPlan` the state was trained with (``p.plan(state, batch)``),
            saved as JSON next to the state; `load_plan` reads it back.
        max_to_keep: after saving, keep only the newest this many steps.
        async_: return once the arrays are copied to host memory; call ``.wait()`` on the
            returned `Checkpointer` before relying on the step (or exiting).

    Returns:
        The `Checkpointer` that saved (already finished and closed unless ``async_``).

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> directory = tempfile.mkdtemp()
        >>> _ = save(directory, {"w": jnp.ones((2, 2))}, step=10)
        >>> latest_step(directory)
        10
    """
    checkpointer = Checkpointer(directory, max_to_keep=max_to_keep, async_=async_)
    checkpointer.save(state, step, plan=plan)
    if not async_:
        checkpointer.close()
    return checkpointer


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step in ``directory``; None when there is none (or no directory).

    Steps still being written (orbax's temporary directories, e.g. left by a killed
    process) are never counted.
    """
    if not Path(directory).is_dir():
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Every complete step in ``directory``, oldest first ([] when none)."""
    if not Path(directory).is_dir():
        return []
    with _manager(directory) as manager:
        return sorted(manager.all_steps())


def _check_step(directory: Path, step: int | None) -> int:
    """The step to read (the latest when None), after checking that it is complete."""
    if not directory.is_dir():
        raise CheckpointError(f"No checkpoint directory at {directory}: it does not exist. "
                              "Pass the directory `save` wrote to.")
    steps = all_steps(directory)
    if not steps:
        raise CheckpointError(
            f"{directory} holds no complete checkpoint step: expected subdirectories named "
            f"by step number (e.g. {directory / '100'}) written by alpa_lite.checkpoint.save; "
            f"found {sorted(p.name for p in directory.iterdir())[:10]}.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"Step {step} is not in {directory}; its complete steps are "
                              f"{steps}. Pass one of them, or step=None for the latest.")
    state_dir = directory / str(step) / _STATE
    missing = [name for name in ("_METADATA", "manifest.ocdbt")
               if not (state_dir / name).exists()]
    if not state_dir.is_dir() or missing:
        raise CheckpointError(
            f"Step {step} in {directory} is truncated or not an alpa_lite checkpoint: "
            f"{state_dir} {'is missing' if state_dir.is_dir() else 'does not exist'}"
            f"{' (' + ', '.join(missing) + ')' if state_dir.is_dir() else ''}. Restore "
            f"another step (complete steps: {steps}) or save again.")
    return step


def _leaf_name(path) -> str:
    """A key path as orbax names the leaf (``opt_state.0.trace.params.Dense_0.bias``)."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def _saved_leaves(metadata) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves(metadata.tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {leaf.name: leaf for leaf in leaves if hasattr(leaf, "shape")}


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
    """Shape and dtype of a `like` leaf: an array, a ShapeDtypeStruct or a Python/NumPy
    scalar (a fresh `TrainState`'s step is the Python int 0, saved as an int32 array)."""
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return tuple(leaf.shape), jax.numpy.dtype(leaf.dtype)
    return (), jax.numpy.asarray(leaf).dtype


def _check_like(like: Any, saved: dict[str, Any], where: Path) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]:
        name = _leaf_name(path)
        if name not in saved:
            raise CheckpointError(
                f"Leaf {name!r} of `like` is not in the checkpoint {where} (it holds "
                f"{len(saved)} arrays, e.g. {sorted(saved)[:5]}). Pass a `like` with the "
                "structure of the saved state.")
        got = saved[name]
        want_shape, want_dtype = _shape_dtype(leaf)
        if tuple(got.shape) != want_shape or jax.numpy.dtype(got.dtype) != want_dtype:
            raise CheckpointError(
                f"Leaf {name!r}: `like` wants {want_dtype}{list(want_shape)}, the checkpoint "
                f"{where} holds {got.dtype}{list(got.shape)}. Build `like` from the model "
                "config the checkpoint was saved with.")


def _targets(like: Any, shardings: Any) -> tuple[list, Any]:
    leaves, tree = jax.tree_util.tree_flatten(like)
    if shardings is None:
        device = jax.local_devices()[0]
        targets = [jax.sharding.SingleDeviceSharding(device)] * len(leaves)
    else:
        targets = jax.tree_util.tree_leaves(
            shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(targets) != len(leaves):
            raise CheckpointError(
                f"`shardings` has {len(targets)} leaves but `like` has {len(leaves)}; pass "
                "the shardings of the same argument, e.g. p.input_shardings(state, "
                "batch)[0] for the state.")
    return [jax.ShapeDtypeStruct(*_shape_dtype(leaf), sharding=sharding)
            for leaf, sharding in zip(leaves, targets)], tree


def _has_local_shards(target: jax.ShapeDtypeStruct) -> bool:
    return any(d.process_index == jax.process_index() for d in target.sharding.device_set)


def _without_local_shards(target: jax.ShapeDtypeStruct) -> jax.Array:
    """The global array of a leaf that lives only on other processes' devices (e.g. a
    pipeline stage on another host): nothing to read here."""
    return jax.make_array_from_single_device_arrays(target.shape, target.sharding, [],
                                                    dtype=target.dtype)


def restore(directory: str | os.PathLike, like: Any, step: int | None = None, *,
            shardings: Any = None) -> Any:
    """Reads a saved state into the structure of ``like``.

    Args:
        directory: the checkpoint directory.
        like: a pytree like the saved state, with arrays or `jax.ShapeDtypeStruct`s as leaves
            (e.g. ``jax.eval_shape`` of the state's initialiser); its non-array parts (a
            `TrainState`'s ``apply_fn`` and ``tx``) are kept.
        step: the step to read; None: the latest complete step.
        shardings: a pytree of `jax.sharding.Sharding`s matching ``like``, e.g.
            ``p.input_shardings(state, batch)[0]``: every array is placed there, each
            process reading only its shards. None: every array whole on the first local
            device.

    Returns:
        The state, shaped like ``like``.

    Raises:
        CheckpointError: no such directory or step, a truncated or foreign step, or a leaf
            of ``like`` that is missing or has another shape or dtype than the saved one.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp
        >>> directory = tempfile.mkdtemp()
        >>> _ = save(directory, {"w": jnp.arange(4.0)}, step=1)
        >>> restore(directory, like={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})["w"]
        Array([0., 1., 2., 3.], dtype=float32)
    """
    directory = Path(directory).absolute()
    step = _check_step(directory, step)
    where = directory / str(step)
    with _manager(directory) as manager:
        _check_like(like, _saved_leaves(manager.item_metadata(step)[_STATE]), where)
        targets, tree = _targets(like, shardings)
        # A leaf with no shard on this process is skipped (orbax's PLACEHOLDER): orbax
        # cannot build an array without local shards, so it is made here, empty.
        wanted = [t if _has_local_shards(t) else _orbax().PLACEHOLDER for t in targets]
        restore_args = [_orbax().ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                             dtype=t.dtype) if t is not _orbax().PLACEHOLDER else t
                        for t in wanted]
        restored = manager.restore(step, args=_orbax().args.Composite(**{
            _STATE: _orbax().args.PyTreeRestore(
                item=jax.tree_util.tree_unflatten(tree, wanted),
                restore_args=jax.tree_util.tree_unflatten(tree, restore_args))}))[_STATE]
    leaves, got_tree = jax.tree_util.tree_flatten(restored,
                                                  is_leaf=lambda x: x is _orbax().PLACEHOLDER)
    if got_tree != tree:  # leaves are matched by position below: the structure must agree
        raise CheckpointError(f"Restoring {where} gave a tree of another structure than "
                              f"`like`: {got_tree} instead of {tree}.")
    return jax.tree_util.tree_unflatten(tree, [
        _without_local_shards(t) if leaf is _orbax().PLACEHOLDER else leaf
        for leaf, t in zip(leaves, targets)])


def load_plan(directory: str | os.PathLike, step: int | None = None) -> ParallelPlan | None:
    """The `ParallelPlan` saved with ``step`` (the latest when None); None if none was saved.

    Give it to ``parallelize(...).use_plan(plan)`` to resume on the same cluster without
    solving again.
    """
    directory = Path(directory).absolute()
    step = _check_step(directory, step)
    if not (directory / str(step) / _PLAN).is_dir():
        return None
    with _manager(directory) as manager:
        restored = manager.restore(step, args=_orbax().args.Composite(
            **{_PLAN: _orbax().args.JsonRestore()}))
    return ParallelPlan.from_json(json.dumps(restored[_PLAN]))
