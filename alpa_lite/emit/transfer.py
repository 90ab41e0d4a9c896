"""Moving arrays between device sets, also across processes.

In one process, `jax.device_put` moves arrays between any shardings. Across processes it does
not work by default on CPU, and with jax's cross-host transfer flag it hung in 3 of 6 trials
(``shared/design/JAX_FACTS.md`` section 7); jitted collectives were reliable. So when the
job has several processes, a move between two disjoint device sets is one jitted collective
on the union of the two meshes (`CrossMeshMove`), which every process calls (a process owning
none of the devices launches nothing).

The collective is an all-reduce (``psum``) in which only the sending devices hold the data and
every other device zeros, so each receiver ends with exactly the sent values (adding zeros is
exact; a ``-0.0`` arrives as ``0.0``). A ``ppermute`` would move half the bytes, but
back-to-back cross-process ``ppermute``s of different sizes broke gloo's message matching on
CPU (``alpa-lite profile comm --kinds send-recv`` under the launcher aborted with "Received
data size doesn't match expected size"); an all-reduce cannot finish on one process before
every process has sent and received, so consecutive transfers cannot interleave.

The union array is built from the source's shards without copying
(`jax.make_array_from_single_device_arrays`):

- Same device count: the destination devices are laid out like the source mesh; a leading
  ``_pipe`` axis of size 2 pairs source device ``i`` with destination device ``i``, which
  receives exactly that shard; then the array is resharded on the destination to the wanted
  spec if that differs.
- Different device counts: the source is first replicated over its mesh, one source device
  contributes the full value to an all-reduce over all devices of both meshes, then the
  destination resharding as above.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alpa_lite._jax_compat import key_impl_of_dtype
from alpa_lite.errors import InvalidConfigError

_PIPE = "_pipe"


def multi_process() -> bool:
    return jax.process_count() > 1


def _device_ids(sharding: NamedSharding) -> frozenset:
    return frozenset(d.id for d in sharding.device_set)


class CrossMeshMove:
    """Moves arrays from ``src`` to ``dst`` shardings on disjoint device sets (see module)."""

    def __init__(self, src: Sequence[NamedSharding], dst: Sequence[NamedSharding],
                 avals: Sequence):
        self.src, self.dst = list(src), list(dst)
        # PRNG keys travel as their uint32 data and are wrapped again on arrival
        self.key_impls = [None] * len(avals)
        data_avals = []
        for i, aval in enumerate(avals):
            if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
                self.key_impls[i] = key_impl_of_dtype(aval.dtype)
                aval = jax.eval_shape(jax.random.key_data, aval)
            data_avals.append(aval)
        self.shapes = [tuple(a.shape) for a in data_avals]
        self.dtypes = [a.dtype for a in data_avals]
        src_mesh = self.src[0].mesh
        if any(s.mesh != src_mesh for s in self.src):
            raise ValueError("internal error: one CrossMeshMove reads from one source mesh")
        a_devices = list(src_mesh.devices.flat)
        b_devices = list(self.dst[0].mesh.devices.flat)
        if set(d.id for d in a_devices) & set(d.id for d in b_devices):
            raise ValueError("internal error: CrossMeshMove needs disjoint device sets")
        self.aligned = len(a_devices) == len(b_devices)
        if self.aligned:
            names = (_PIPE,) + tuple(src_mesh.axis_names)
            union = np.stack([src_mesh.devices,
                              np.array(b_devices, dtype=object).reshape(src_mesh.devices.shape)])
            self.union = Mesh(union, names)
            landing_mesh = Mesh(union[1], tuple(src_mesh.axis_names))
            self.staged = [s.spec for s in self.src]
            self.landing = [NamedSharding(landing_mesh, s.spec) for s in self.src]
            self.prepare = None
            self.senders = {d.id for d in a_devices}  # every source shard is sent
        else:
            self.union = Mesh(np.array(a_devices + b_devices, dtype=object), (_PIPE,))
            replicated = NamedSharding(src_mesh, PartitionSpec())
            self.staged = [PartitionSpec() for _ in self.src]
            landing_mesh = Mesh(np.array(b_devices, dtype=object), (_PIPE,))
            self.landing = [NamedSharding(landing_mesh, PartitionSpec()) for _ in self.src]
            self.prepare = jax.jit(lambda *xs: xs, out_shardings=tuple(replicated
                                                                       for _ in self.src))
            self.senders = {a_devices[0].id}  # one full copy is sent
        copies = 2 if self.aligned else len(self.union.devices.flat)
        self.union_shardings = [NamedSharding(self.union, self._union_spec(spec, shape))
                                for spec, shape in zip(self.staged, self.shapes)]
        self.union_shapes = [self._union_shape(shape, copies) for shape in self.shapes]
        specs = tuple(s.spec for s in self.union_shardings)
        dtypes = self.dtypes

        def exchange(*blocks):
            # an all-reduce in which only the senders hold data (zeros elsewhere): every
            # device ends with the sent value, and no process can run ahead into the next
            # exchange before it has received (back-to-back cross-process ppermutes of
            # different sizes broke gloo's message matching on CPU)
            out = []
            for block, dtype in zip(blocks, dtypes):
                if np.dtype(dtype) == np.bool_:
                    out.append(jax.lax.psum(block.astype(jnp.uint8), _PIPE).astype(jnp.bool_))
                else:
                    out.append(jax.lax.psum(block, _PIPE))
            return tuple(out)

        self.exchange = jax.jit(jax.shard_map(exchange, mesh=self.union, in_specs=specs,
                                              out_specs=specs, check_vma=False))
        self.finish = [_finisher(land, dst, len(shape), impl) for land, dst, shape, impl in
                       zip(self.landing, self.dst, self.shapes, self.key_impls)]
        self._zeros: dict = {}
        self._b_ids = {d.id for d in b_devices}

    @staticmethod
    def _union_spec(spec: PartitionSpec, shape) -> PartitionSpec:
        """The source spec with the ``_pipe`` axis added in front of dim 0 (scalars: a new
        leading dim of size 1 per device)."""
        if not shape:
            return PartitionSpec(_PIPE)
        parts = list(spec) + [None] * (len(shape) - len(spec))
        first = parts[0]
        first = () if first is None else ((first,) if isinstance(first, str) else tuple(first))
        return PartitionSpec((_PIPE,) + first, *parts[1:])

    @staticmethod
    def _union_shape(shape, copies: int) -> tuple:
        return (copies,) if not shape else (shape[0] * copies,) + tuple(shape[1:])

    def _zeros_on(self, device, shape, dtype):
        key = (device.id, shape, np.dtype(dtype).str)
        if key not in self._zeros:
            self._zeros[key] = jax.device_put(np.zeros(shape, dtype), device)
        return self._zeros[key]

    def __call__(self, *values):
        values = [jax.random.key_data(v) if impl is not None else v
                  for v, impl in zip(values, self.key_impls)]
        if self.prepare is not None:
            values = self.prepare(*values)
        union_values = []
        for value, shape, union_shape, sharding, dtype in zip(
                values, self.shapes, self.union_shapes, self.union_shardings, self.dtypes):
            block = sharding.shard_shape(union_shape)
            pieces = [(s.data if shape else s.data.reshape(1)) if s.device.id in self.senders
                      else self._zeros_on(s.device, block, dtype)
                      for s in value.addressable_shards]
            pieces += [self._zeros_on(device, block, dtype)
                       for device in sharding.addressable_devices if device.id in self._b_ids]
            union_values.append(jax.make_array_from_single_device_arrays(
                union_shape, sharding, pieces, dtype=dtype))
        exchanged = jax.block_until_ready(self.exchange(*union_values))
        results = []
        for value, shape, landing, finish, dtype in zip(exchanged, self.shapes, self.landing,
                                                        self.finish, self.dtypes):
            pieces = [s.data if shape else s.data.reshape(()) for s in value.addressable_shards
                      if s.device.id in self._b_ids]
            landed = jax.make_array_from_single_device_arrays(shape, landing, pieces,
                                                              dtype=dtype)
            results.append(landed if finish is None else finish(landed))
        return results


def _finisher(landing: NamedSharding, dst: NamedSharding, ndim: int, key_impl):
    if key_impl is not None:
        return jax.jit(lambda x: jax.random.wrap_key_data(x, impl=key_impl), out_shardings=dst)
    if landing.is_equivalent_to(dst, ndim):
        return None
    return jax.jit(lambda x: x, out_shardings=dst)


class ReplicateEverywhere:
    """Makes a small array held on one stage's submesh an array replicated on every device
    of the job, so each process can read it (`float(loss)`), as `jax.jit` returns it.

    The value is replicated within its submesh, moved with a `CrossMeshMove` (a jitted
    collective) to the devices outside it, and the two halves are assembled into one global
    array.
    """

    def __init__(self, src: NamedSharding, aval):
        inside = list(src.mesh.devices.flat)
        ids = {d.id for d in inside}
        outside = [d for d in jax.devices() if d.id not in ids]
        self.shape = tuple(aval.shape)
        self.within = jax.jit(lambda x: x, out_shardings=NamedSharding(src.mesh, PartitionSpec()))
        self.move = CrossMeshMove(
            [NamedSharding(src.mesh, PartitionSpec())],
            [NamedSharding(Mesh(np.array(outside, dtype=object), (_PIPE,)), PartitionSpec())],
            [jax.ShapeDtypeStruct(self.shape, aval.dtype)]) if outside else None
        self.sharding = NamedSharding(Mesh(np.array(inside + outside, dtype=object), (_PIPE,)),
                                      PartitionSpec())

    def __call__(self, value):
        value = self.within(value)
        if self.move is None:
            return value
        moved = self.move(value)[0]
        shards = [s.data for s in value.addressable_shards] + \
            [s.data for s in moved.addressable_shards]
        return jax.make_array_from_single_device_arrays(self.shape, self.sharding, shards)


_movers: dict = {}


def place(values: Sequence, shardings: Sequence[NamedSharding]) -> list:
    """``values`` moved to ``shardings`` (host values, or arrays placed elsewhere).

    In one process: one batched `jax.device_put`. Across processes (every process calls
    this with the same values), by kind of value:

    - host values and uncommitted local arrays (the same value on every process):
      `jax.device_put` builds the global array (PRNG keys via their data);
    - global arrays on the same devices: `jax.device_put` reshards (a jitted collective);
    - global arrays on disjoint devices (another stage's mesh): a `CrossMeshMove`;
    - global arrays on overlapping device sets: gathered to every host, then placed.
    """
    if not multi_process():
        return jax.device_put(list(values), list(shardings))
    result = list(values)
    batch = []
    for i, (value, sharding) in enumerate(zip(values, shardings)):
        if not isinstance(value, jax.Array) or not value.committed:
            if _is_key(value):
                result[i] = _place_key_data(np.asarray(jax.random.key_data(value)),
                                            jax.random.key_impl(value), sharding)
            else:
                batch.append(i)
            continue
        if not isinstance(value.sharding, NamedSharding):
            raise InvalidConfigError(
                f"An argument is a jax array committed to {value.sharding}, which is not a "
                "global value in a multi-process job (each process holds its own). Pass "
                "numpy arrays or uncommitted jax arrays (the same on every process), arrays "
                "returned by a parallelized step, or a batch from "
                "alpa_lite.distributed.global_batch_from_local.")
        src, dst = _device_ids(value.sharding), _device_ids(sharding)
        if src == dst:
            batch.append(i)
        elif not src & dst:
            key = (value.sharding, sharding, value.shape, value.dtype)
            if key not in _movers:
                _movers[key] = CrossMeshMove([value.sharding], [sharding],
                                             [jax.ShapeDtypeStruct(value.shape, value.dtype)])
            result[i] = _movers[key](value)[0]
        elif _is_key(value):  # gathered as its data
            result[i] = _place_key_data(gather_to_hosts(value), jax.random.key_impl(value),
                                        sharding)
        else:
            result[i] = jax.device_put(gather_to_hosts(value), sharding)
    if batch:
        placed = jax.device_put([values[i] for i in batch], [shardings[i] for i in batch])
        for i, value in zip(batch, placed):
            result[i] = value
    return result


def _is_key(value) -> bool:
    return isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype,
                                                                  jax.dtypes.prng_key)


def _place_key_data(data: np.ndarray, impl, sharding: NamedSharding):
    """A global PRNG key array from its host data (device_put refuses key arrays there)."""
    placed = jax.device_put(data, NamedSharding(sharding.mesh, sharding.spec))
    return jax.jit(lambda x: jax.random.wrap_key_data(x, impl=impl),
                   out_shardings=sharding)(placed)


def gather_to_hosts(value) -> np.ndarray:
    """The global value of an array, as numpy, on every process (a collective).

    Arrays with shards on every process are all-gathered by `multihost_utils`; arrays living
    on some processes only (e.g. on one pipeline stage's mesh) are replicated on their own
    mesh and then summed over every device from one holder's copy (zeros elsewhere).
    """
    # decided on global facts only (every process must take the same branch): an
    # uncommitted array is a local value, the same on every process
    if not isinstance(value, jax.Array) or not multi_process() or not value.committed:
        return np.asarray(value)
    if _is_key(value):
        value = jax.random.key_data(value)
    from jax.experimental import multihost_utils

    holders = {d.process_index for d in value.sharding.device_set}
    if len(holders) == jax.process_count():
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    mesh = value.sharding.mesh
    replicated = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))(value)
    devices = jax.devices()
    everywhere = Mesh(np.array(devices, dtype=object), ("_all",))
    holder = min(value.sharding.device_set, key=devices.index).id  # one copy is summed
    dtype = np.uint8 if value.dtype == np.bool_ else value.dtype
    shape = (1,) + tuple(value.shape)
    own = {s.device.id: s.data for s in replicated.addressable_shards}
    pieces = [own[d.id].astype(dtype).reshape(shape) if d.id == holder
              else jax.device_put(np.zeros(shape, dtype), d)
              for d in everywhere.local_devices]
    stacked = jax.make_array_from_single_device_arrays(
        (len(devices),) + tuple(value.shape), NamedSharding(everywhere, PartitionSpec("_all")),
        pieces, dtype=dtype)
    gathered = jax.jit(jax.shard_map(
        lambda block: jax.lax.psum(block[0], "_all"), mesh=everywhere,
        in_specs=PartitionSpec("_all"), out_specs=PartitionSpec(), check_vma=False))(stacked)
    return np.asarray(gathered.addressable_data(0)).astype(value.dtype)
