"""Cluster descriptions: hosts, devices, memory, peak flop/s, links, memory bandwidth and
launch latency; the planner's input.

A `ClusterSpec` describes machines you may not have (presets, JSON files) or the ones you run
on (`ClusterSpec.from_devices`). `ClusterSpec.logical_mesh` turns a submesh of it (Alpa §5:
``n`` hosts x ``m`` devices) into the `LogicalMesh` the intra-op ILP prices (Alpa §4): a
logical axis whose device groups span hosts gets the inter-host link, every other axis the
intra-host one, with ``alpha = link alpha`` and ``beta = 1 / link bandwidth``.

Bandwidths are nccl-tests *bus* bandwidths per direction (what a ring collective over the
link approaches; see docs/profiling.md); the inter-host one is a host's whole NIC bandwidth.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import types
from typing import Mapping, Sequence

from alpa_lite.inter_op.stage_dp import enumerate_submesh_shapes
from alpa_lite.errors import InvalidConfigError
from alpa_lite.mesh import (DEFAULT_AXIS_NAMES, LogicalMesh, check_fraction, check_rate,
                            check_seconds)
from alpa_lite.profiling.database import ProfileDatabase

CLUSTER_FORMAT_VERSION = 1
_JSON_KEYS = ("format_version", "name", "device_kind", "num_hosts", "devices_per_host",
              "memory_per_device_bytes", "peak_flops_per_s", "intra_host", "inter_host",
              "profile", "memory_bandwidth_bytes_per_s", "launch_latency_s",
              "shared_host_compute", "matmul_efficiency", "memory_efficiency",
              "vector_flops_per_s", "kernel_floor_s")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "f16": "float16", "half": "float16", "tf32": "tensorfloat32"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """A link class: latency and per-direction bus bandwidth.

    Example:
        >>> LinkSpec(alpha_s=1e-5, bandwidth_bytes_per_s=100e9).beta_s_per_byte
        1e-11
    """

    alpha_s: float
    bandwidth_bytes_per_s: float

    def __post_init__(self):
        if not (math.isfinite(self.alpha_s) and self.alpha_s >= 0):
            raise InvalidConfigError(
                f"Link alpha_s must be finite and >= 0 seconds; got {self.alpha_s!r}. "
                "Use e.g. alpha_s=1e-5.")
        if not (math.isfinite(self.bandwidth_bytes_per_s) and self.bandwidth_bytes_per_s > 0):
            raise InvalidConfigError(
                f"Link bandwidth_bytes_per_s must be positive and finite; got "
                f"{self.bandwidth_bytes_per_s!r}. Use e.g. 100e9 for 100 GB/s.")

    @property
    def beta_s_per_byte(self) -> float:
        return 1.0 / self.bandwidth_bytes_per_s


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """A homogeneous cluster: ``num_hosts`` hosts of ``devices_per_host`` devices.

    Attributes:
        num_hosts: hosts (nodes, processes) in the cluster.
        devices_per_host: accelerators per host.
        memory_per_device_bytes: memory of one device.
        peak_flops_per_s: ``((dtype name, flop/s), ...)`` peak dense throughput of one device
            (a dict is accepted and turned into sorted pairs so the spec stays hashable).
        intra_host: link between devices of one host.
        inter_host: link between hosts.
        device_kind: e.g. ``"NVIDIA A100-SXM4-80GB"``.
        name: a label (the preset name, or ``""``).
        profile: measured timings; a `LogicalMesh` built from this spec carries it.
        memory_bandwidth_bytes_per_s: achievable memory bandwidth of one device (the roofline's
            bytes term), or None when unknown.
        launch_latency_s: fixed seconds of launching one program (dispatch to completion);
            a profile's measurement for the submesh's device count takes precedence.
        shared_host_compute: the devices of a host share one pool of compute (simulated CPU
            devices share the host's cores), so programs on different submeshes of a host
            take turns instead of running side by side: a pipeline's stages on one host
            cost the sum of their work, not the overlapped schedule.
        matmul_efficiency: the fraction of the dtype's peak large matmuls reach (the device
            model's GEMM efficiency); a profile's matmul rows replace it.
        memory_efficiency: the fraction of ``memory_bandwidth_bytes_per_s`` memory-bound
            kernels reach; 1 once a profile measured the bandwidth.
        vector_flops_per_s: flop/s of the operators that are not matmuls (a GPU's CUDA
            cores), or None to price them like matmuls.
        kernel_floor_s: the least time of one unfused kernel (launch and tail), added to every
            kernel; a profile's per-operator latency replaces it.

    Example:
        >>> spec = get_cluster_preset("a100-80gb-8x").with_hosts(2)
        >>> mesh = spec.logical_mesh((2, 8), (2, 8))
        >>> mesh.axis_links, mesh.beta_s_per_byte[0] > mesh.beta_s_per_byte[1]
        (('inter', 'intra'), True)
    """

    num_hosts: int
    devices_per_host: int
    memory_per_device_bytes: int
    peak_flops_per_s: tuple[tuple[str, float], ...]
    intra_host: LinkSpec
    inter_host: LinkSpec
    device_kind: str = "unknown"
    name: str = ""
    profile: ProfileDatabase | None = None
    memory_bandwidth_bytes_per_s: float | None = None
    launch_latency_s: float = 0.0
    shared_host_compute: bool = False
    matmul_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    vector_flops_per_s: float | None = None
    kernel_floor_s: float = 0.0

    def __post_init__(self):
        _check_count(self.num_hosts, "num_hosts", "hosts")
        _check_count(self.devices_per_host, "devices_per_host", "devices on each host")
        memory = self.memory_per_device_bytes
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not (
                math.isfinite(memory) and memory > 0):
            raise InvalidConfigError(
                f"memory_per_device_bytes must be a positive number of bytes; got {memory!r}. "
                "Use e.g. memory_per_device_bytes=parse_bytes('32GiB').")
        object.__setattr__(self, "memory_per_device_bytes", int(memory))
        object.__setattr__(self, "peak_flops_per_s", _peak_pairs(self.peak_flops_per_s))
        for name in ("intra_host", "inter_host"):
            if not isinstance(getattr(self, name), LinkSpec):
                raise InvalidConfigError(
                    f"{name} must be a LinkSpec(alpha_s=..., bandwidth_bytes_per_s=...); got "
                    f"{getattr(self, name)!r}.")
        if self.profile is not None and not isinstance(self.profile, ProfileDatabase):
            raise InvalidConfigError(
                f"profile must be a ProfileDatabase or None; got {type(self.profile).__name__}. "
                "Load one with ProfileDatabase.load(path).")
        if self.memory_bandwidth_bytes_per_s is not None:
            check_rate(self.memory_bandwidth_bytes_per_s, "memory_bandwidth_bytes_per_s",
                       "2.0e12")
        check_seconds(self.launch_latency_s, "launch_latency_s", "2e-5")
        check_seconds(self.kernel_floor_s, "kernel_floor_s", "4e-6")
        check_fraction(self.matmul_efficiency, "matmul_efficiency", "0.8")
        check_fraction(self.memory_efficiency, "memory_efficiency", "0.85")
        if self.vector_flops_per_s is not None:
            check_rate(self.vector_flops_per_s, "vector_flops_per_s", "19.5e12")

    # ----------------------------------------------------------------- queries

    @property
    def num_devices(self) -> int:
        return self.num_hosts * self.devices_per_host

    def peak_flops(self, dtype: str = "float32") -> float:
        """Peak dense flop/s of one device for ``dtype`` (aliases: fp32, bf16, fp16, tf32).

        Raises:
            InvalidConfigError: if the spec lists no peak for ``dtype``.
        """
        table = dict(self.peak_flops_per_s)
        key = _DTYPE_ALIASES.get(str(dtype), str(dtype))
        if key not in table:
            raise InvalidConfigError(
                f"Cluster {self.name or self.device_kind!r} lists no peak flop/s for dtype "
                f"{dtype!r}; it lists {sorted(table)}. Add it to peak_flops_per_s or use a "
                "listed dtype.")
        return table[key]

    @property
    def training_dtype(self) -> str:
        """The compute dtype a user trains in here: the faster half type by this spec's peaks
        (bfloat16 on a tie, as it needs no loss scaling), or float32 where neither half type
        is faster (a CPU, or a spec that lists float32 only).

        Example:
            >>> [get_cluster_preset(n).training_dtype for n in ("a100-80gb-8x", "v100-16gb-4x",
            ...                                                  "cpu-sim")]
            ['bfloat16', 'float16', 'float32']
        """
        table = dict(self.peak_flops_per_s)
        best = max(("bfloat16", "float16"), key=lambda d: table.get(d, 0.0))
        return best if table.get(best, 0.0) > table.get("float32", 0.0) else "float32"

    def enumerate_submesh_shapes(self) -> tuple[tuple[int, int], ...]:
        """Alpa's submesh shapes: ``(1, 2^k)`` within a host, then ``(n, devices_per_host)``
        (`inter_op.stage_dp.enumerate_submesh_shapes`, the planner's enumeration)."""
        return tuple(enumerate_submesh_shapes(self.num_hosts, self.devices_per_host))

    def logical_mesh(self, submesh_shape: tuple[int, int], logical_shape: Sequence[int], *,
                     dtype: str = "float32",
                     axis_names: tuple[str, ...] = DEFAULT_AXIS_NAMES) -> LogicalMesh:
        """The `LogicalMesh` of a submesh ``(hosts, devices per host)`` seen as ``logical_shape``.

        Devices are numbered host-major (device ``d`` of host ``h`` is ``h * m + d``) and laid
        out row-major into ``logical_shape``. A logical axis any of whose device groups holds
        devices of two hosts uses `inter_host`, every other axis `intra_host`.

        Args:
            submesh_shape: ``(n_hosts, n_devices)`` with ``n_hosts <= num_hosts`` and
                ``n_devices <= devices_per_host``.
            logical_shape: 1 or 2 axis sizes whose product is ``n_hosts * n_devices``, e.g.
                ``(2, 8)``, ``(4, 4)``, ``(16, 1)`` or ``(16,)`` for submesh ``(2, 8)``.
            dtype: which peak flop/s the mesh gets for dtypes without a peak of their own
                (the mesh also gets every per-dtype peak of this spec).
            axis_names: names of the logical axes.

        Raises:
            InvalidConfigError: if the submesh does not fit or the device counts differ.
        """
        n_hosts, n_devices = _check_submesh(submesh_shape, self)
        shape = tuple(int(s) for s in logical_shape)
        if not 1 <= len(shape) <= 2 or any(s < 1 for s in shape) or (
                math.prod(shape) != n_hosts * n_devices):
            raise InvalidConfigError(
                f"logical_shape must have 1 or 2 positive axes holding the submesh's "
                f"{n_hosts * n_devices} devices; got {tuple(logical_shape)}. For submesh "
                f"{(n_hosts, n_devices)} use e.g. {(n_hosts, n_devices)} or "
                f"{(n_hosts * n_devices, 1)}.")
        links = tuple("inter" if _axis_spans_hosts(shape, axis, n_devices) else "intra"
                      for axis in range(len(shape)))
        link_specs = [self.inter_host if link == "inter" else self.intra_host for link in links]
        # A host's NICs serve every group of an axis that spans hosts at once: the groups
        # holding one device of each host (a (hosts, devices) view's axis 0) each get a share.
        shares = [_host_share(shape, axis, n_devices) if link == "inter" else 1.0
                  for axis, link in enumerate(links)]
        bandwidth = self.memory_bandwidth_bytes_per_s
        return LogicalMesh(
            shape=shape, axis_names=tuple(axis_names)[: len(shape)],
            alpha_s=tuple(s.alpha_s for s in link_specs),
            beta_s_per_byte=tuple(s.beta_s_per_byte / share
                                  for s, share in zip(link_specs, shares)),
            memory_per_device_bytes=self.memory_per_device_bytes,
            peak_flops_per_s=self.peak_flops(dtype), profile=self.profile, axis_links=links,
            peak_flops_by_dtype=self.peak_flops_per_s,
            memory_bandwidth_bytes_per_s=None if bandwidth is None else (
                bandwidth * self.memory_efficiency),
            launch_latency_s=self.launch_latency_for(n_hosts * n_devices),
            op_latency_s=self.op_latency_for(n_hosts * n_devices),
            matmul_efficiency=self.matmul_efficiency, vector_flops_per_s=self.vector_flops_per_s)

    def op_latency_for(self, num_devices: int) -> float:
        """Extra seconds per kernel of a program on ``num_devices`` devices: the profile's
        measurement (interpolated), else ``kernel_floor_s``."""
        measured = None if self.profile is None else self.profile.op_latency_s(num_devices)
        return self.kernel_floor_s if measured is None else measured

    def launch_latency_for(self, num_devices: int) -> float:
        """Launch latency of a program on ``num_devices`` devices.

        The profile's measurements interpolated to that many devices, else
        ``launch_latency_s``.
        """
        measured = None if self.profile is None else self.profile.launch_latency_s(num_devices)
        return self.launch_latency_s if measured is None else measured

    # ----------------------------------------------------------------- copies

    def with_hosts(self, num_hosts: int) -> "ClusterSpec":
        """The same cluster with ``num_hosts`` hosts."""
        return dataclasses.replace(self, num_hosts=num_hosts)

    def with_memory(self, memory_per_device: int | str) -> "ClusterSpec":
        """The same cluster with another device memory (bytes, or a string like ``"32GiB"``)."""
        memory = parse_bytes(memory_per_device) if isinstance(memory_per_device, str) else (
            memory_per_device)
        return dataclasses.replace(self, memory_per_device_bytes=memory)

    def with_profile(self, profile: ProfileDatabase) -> "ClusterSpec":
        """Attach measured timings.

        Links measured in ``profile`` get its alpha-beta fit; a measured memory bandwidth and
        single-device launch latency replace this spec's.
        """
        changes: dict = {"profile": profile}
        if profile.memory_bandwidth_bytes_per_s() is not None:  # measured: already achieved
            changes["memory_bandwidth_bytes_per_s"] = profile.memory_bandwidth_bytes_per_s()
            changes["memory_efficiency"] = 1.0
        if profile.launch_latency_s(1) is not None:
            changes["launch_latency_s"] = profile.launch_latency_s(1)
        for link, field in (("intra", "intra_host"), ("inter", "inter_host")):
            if profile.has_link(link):
                alpha, beta = profile.fit_alpha_beta(link)
                if beta > 0:  # a latency-only fit says nothing about bandwidth: keep ours
                    changes[field] = LinkSpec(alpha_s=alpha, bandwidth_bytes_per_s=1.0 / beta)
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- building

    @classmethod
    def from_devices(cls, devices=None, *, profile: ProfileDatabase | None = None,
                     ) -> "ClusterSpec":
        """A spec of live jax devices (default: ``jax.devices()``).

        Hosts are the devices' distinct ``process_index``es; memory is the device's
        ``memory_stats()["bytes_limit"]`` when the backend reports it (GPUs do), else the
        host's RAM split over its devices. Peak flop/s and links come from the preset whose
        GPU name appears in ``device_kind``, else from per-platform defaults.
        """
        if devices is None:
            import jax  # only here: building a spec by hand must not start a backend

            devices = jax.devices()
        devices = list(devices)
        if not devices:
            raise InvalidConfigError("from_devices needs at least one device; got none.")
        per_host: dict[int, int] = {}
        for device in devices:
            per_host[device.process_index] = per_host.get(device.process_index, 0) + 1
        if len(set(per_host.values())) != 1:
            raise InvalidConfigError(
                f"Every host must have the same number of devices; got {per_host} "
                "(process_index: devices). Pass an equal number of devices per host.")
        devices_per_host = next(iter(per_host.values()))
        template = _template_for(devices[0].platform, devices[0].device_kind)
        spec = dataclasses.replace(
            template, num_hosts=len(per_host), devices_per_host=devices_per_host,
            memory_per_device_bytes=_device_memory_bytes(devices[0], devices_per_host),
            device_kind=devices[0].device_kind, name=f"live-{devices[0].platform}")
        return spec.with_profile(profile) if profile is not None else spec

    # ----------------------------------------------------------------- JSON

    def to_dict(self) -> dict:
        return {
            "format_version": CLUSTER_FORMAT_VERSION, "name": self.name,
            "device_kind": self.device_kind, "num_hosts": self.num_hosts,
            "devices_per_host": self.devices_per_host,
            "memory_per_device_bytes": self.memory_per_device_bytes,
            "peak_flops_per_s": dict(self.peak_flops_per_s),
            "intra_host": dataclasses.asdict(self.intra_host),
            "inter_host": dataclasses.asdict(self.inter_host),
            "profile": None if self.profile is None else self.profile.to_dict(),
            "memory_bandwidth_bytes_per_s": self.memory_bandwidth_bytes_per_s,
            "launch_latency_s": self.launch_latency_s,
            "shared_host_compute": self.shared_host_compute,
            "matmul_efficiency": self.matmul_efficiency,
            "memory_efficiency": self.memory_efficiency,
            "vector_flops_per_s": self.vector_flops_per_s,
            "kernel_floor_s": self.kernel_floor_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "ClusterSpec":
        expected = set(_JSON_KEYS)
        if data.get("format_version") != CLUSTER_FORMAT_VERSION or set(data) - expected:
            raise InvalidConfigError(
                f"Not a cluster spec of format_version {CLUSTER_FORMAT_VERSION}: got version "
                f"{data.get('format_version')!r}, unexpected keys {sorted(set(data) - expected)}. "
                f"Expected keys {sorted(expected)}; write one with ClusterSpec.save(path).")
        kw = {k: v for k, v in data.items() if k != "format_version"}
        try:
            kw["intra_host"] = LinkSpec(**kw["intra_host"])
            kw["inter_host"] = LinkSpec(**kw["inter_host"])
            if kw.get("profile") is not None:
                kw["profile"] = ProfileDatabase.from_dict(kw["profile"])
            return cls(**kw)
        except (KeyError, TypeError) as err:
            raise InvalidConfigError(
                f"Incomplete cluster spec ({err}); expected keys {sorted(expected)}.") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ClusterSpec":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClusterSpec":
        try:
            with open(path) as f:
                return cls.from_json(f.read())
        except FileNotFoundError as err:
            raise InvalidConfigError(
                f"Cluster file {os.fspath(path)!r} does not exist. Write one with "
                f"ClusterSpec.save(path), or use a preset: {sorted(CLUSTER_PRESETS)}.") from err
        except json.JSONDecodeError as err:
            raise InvalidConfigError(
                f"{os.fspath(path)!r} is not a JSON cluster spec ({err}).") from err

    def describe(self) -> str:
        """A few readable lines: devices, memory, peak flop/s, links, profile."""
        lines = [
            f"cluster        {self.name or '(unnamed)'}  [{self.device_kind}]",
            f"devices        {self.num_hosts} host(s) x {self.devices_per_host} = "
            f"{self.num_devices}",
            f"memory/device  {format_bytes(self.memory_per_device_bytes)}",
            "peak/device    " + ", ".join(
                f"{dtype} {flops / 1e12:g} TFLOP/s" for dtype, flops in self.peak_flops_per_s),
        ]
        if self.memory_bandwidth_bytes_per_s is not None:
            lines.append(f"memory bw      {self.memory_bandwidth_bytes_per_s / 1e9:.4g} GB/s")
        lines.append(f"launch         {self.launch_latency_s * 1e6:.3g} us per program")
        for label, link in (("intra-host", self.intra_host), ("inter-host", self.inter_host)):
            lines.append(f"{label:<15}alpha {link.alpha_s * 1e6:.3g} us, bus bandwidth "
                         f"{link.bandwidth_bytes_per_s / 1e9:.3g} GB/s")
        if self.profile is not None:
            lines.append(f"profile        {len(self.profile.collectives)} collective rows, "
                         f"{len(self.profile.matmuls)} matmul rows, "
                         f"{len(self.profile.launches)} launch rows, "
                         f"{len(self.profile.memory_bandwidths)} memory-bandwidth rows")
        return "\n".join(lines)


# --------------------------------------------------------------------- parsing


_MESH_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_cluster_string(text: str) -> tuple[int, int]:
    """``"HOSTSxDEVICES"`` -> ``(hosts, devices per host)``.

    Example:
        >>> parse_cluster_string("50x4")
        (50, 4)
    """
    match = _MESH_RE.match(str(text))
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise InvalidConfigError(
            f"Cluster string {text!r} is not of the form HOSTSxDEVICES with two positive "
            "integers (hosts x devices per host). Use e.g. '50x4' or '1x8'.")
    return int(match.group(1)), int(match.group(2))


def parse_bytes(text: str | int) -> int:
    """A byte count from ``"1024"``, ``"32GiB"``, ``"32GB"``, ``"1.5TiB"`` or ``"512M"``.

    ``KiB/MiB/GiB/TiB`` and the bare letters ``K/M/G/T`` are powers of 1024, ``KB/MB/GB/TB``
    powers of 1000 (SI). Case does not matter.

    Example:
        >>> parse_bytes("32GiB"), parse_bytes("32GB"), parse_bytes("1.5TiB")
        (34359738368, 32000000000, 1649267441664)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _BYTES_RE.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise InvalidConfigError(
                f"Cannot read {text!r} as a byte count. Expected a number with an optional "
                f"unit from {sorted(_UNITS, key=_UNITS.get)[1:]}, e.g. '32GiB', '80GB', '1024'.")
        value, unit = float(match.group(1)), match.group(2).lower()
    num_bytes = value * _UNITS[unit]
    if not math.isfinite(num_bytes) or num_bytes < 0:
        raise InvalidConfigError(f"A byte count must be finite and >= 0; got {text!r}.")
    return int(round(num_bytes))


def format_bytes(num_bytes: float) -> str:
    """``34359738368 -> '32 GiB'`` (binary units, up to 3 significant digits)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.3g} {unit}"
    return f"{int(num_bytes)} B"


# --------------------------------------------------------------------- helpers


def _check_count(value, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfigError(
            f"{name} must be a positive integer (number of {what}); got {value!r}. "
            f"Use e.g. {name}=4.")


def _peak_pairs(peaks) -> tuple[tuple[str, float], ...]:
    pairs = tuple(sorted((peaks.items() if isinstance(peaks, Mapping) else
                          ((str(k), v) for k, v in peaks)), key=lambda kv: kv[0]))
    bad = [(k, v) for k, v in pairs if isinstance(v, bool) or not isinstance(v, (int, float))
           or not (math.isfinite(v) and v > 0)]
    if not pairs or bad:
        raise InvalidConfigError(
            f"peak_flops_per_s must map dtype names to positive flop/s; got {peaks!r}"
            f"{f' (bad: {bad})' if bad else ''}. Use e.g. {{'float32': 19.5e12}}.")
    return tuple((str(k), float(v)) for k, v in pairs)


def _check_submesh(submesh_shape, spec: ClusterSpec) -> tuple[int, int]:
    shape = tuple(submesh_shape)
    if (len(shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                               for s in shape)
            or shape[0] > spec.num_hosts or shape[1] > spec.devices_per_host):
        raise InvalidConfigError(
            f"submesh_shape must be (hosts, devices per host) with 1 <= hosts <= "
            f"{spec.num_hosts} and 1 <= devices <= {spec.devices_per_host} for this cluster; "
            f"got {submesh_shape!r}. Use e.g. {(1, spec.devices_per_host)}.")
    return shape


def _axis_spans_hosts(shape: tuple[int, ...], axis: int, devices_per_host: int) -> bool:
    """Whether some group of devices along ``axis`` of a row-major ``shape`` spans hosts."""
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    others = [range(s) if i != axis else range(1) for i, s in enumerate(shape)]
    for index in itertools.product(*others):
        base = sum(i * stride for i, stride in zip(index, strides))
        hosts = {(base + j * strides[axis]) // devices_per_host for j in range(shape[axis])}
        if len(hosts) > 1:
            return True
    return False


def _host_share(shape: tuple[int, ...], axis: int, devices_per_host: int) -> float:
    """The share of a host's network bandwidth one group along ``axis`` gets: the group's
    devices on one host over the host's devices (all groups of the axis run at once).

    Example:
        >>> _host_share((4, 8), 0, 8), _host_share((32,), 0, 8), _host_share((8, 4), 0, 8)
        (0.125, 1.0, 0.25)
    """
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    hosts = [(j * strides[axis]) // devices_per_host for j in range(shape[axis])]
    per_host = max(hosts.count(h) for h in set(hosts))
    return min(1.0, per_host / devices_per_host)


def _template_for(platform: str, device_kind: str) -> ClusterSpec:
    for fragment, preset in _KIND_TEMPLATES:
        if fragment in device_kind:
            return CLUSTER_PRESETS[preset]
    return CLUSTER_PRESETS[_PLATFORM_TEMPLATES.get(platform, "cpu-sim")]


def _device_memory_bytes(device, devices_per_host: int) -> int:
    try:
        stats = device.memory_stats()
    except (RuntimeError, NotImplementedError):  # backends without allocator statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        host_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX host
        return CLUSTER_PRESETS["cpu-sim"].memory_per_device_bytes
    return max(1, host_bytes // devices_per_host)


# --------------------------------------------------------------------- presets
#
# The GPU device model. Every figure below is a public number; docs/simulation.md lists the
# sources and the calibration against Megatron-LM's published step times. A profile measured
# with `alpa-lite profile` (`ClusterSpec.with_profile`) replaces the links, the matmul rates,
# the memory bandwidth and the kernel floor.
#
# Peaks: NVIDIA datasheets, dense math (the "with sparsity" figures are twice these):
# V100 SXM2 125 TFLOP/s fp16 tensor / 15.7 fp32; A100 SXM4 312 bf16/fp16 / 19.5 fp32 (156
# TF32); H100 and H200 SXM 989.5 bf16/fp16 / 67 fp32 (494.5 TF32). Operators other than
# matmuls run on the CUDA cores: `vector_flops_per_s` is the fp32 figure (XLA computes
# elementwise bf16 math in f32).
# HBM (datasheets): V100 900 GB/s, A100 80GB 2,039 GB/s, H100 SXM5 3.35 TB/s, H200 4.8 TB/s.
# _MEMORY_EFFICIENCY: streaming kernels reach about 85 % of the HBM datasheet figure
# (published BabelStream/STREAM-style copy and triad results on V100 and A100 land at 80-90 %).
# _MATMUL_EFFICIENCY: large cuBLAS GEMMs reach 75-90 % of the tensor-core peak (NVIDIA's
# "Matrix Multiplication Background User's Guide" plots; a widely shared H100 measurement,
# gist.github.com/Chillee/2ec89696db8b7ed1c24461159e325405, reaches 780 of 989 TFLOP/s = 79 %
# for a 4224x8192x2048 bf16 GEMM). 0.72 is the value fitted on Megatron-LM's ten A100 points
# (docs/simulation.md): below the large-GEMM range because it also carries what the model
# leaves out (dropout, small and skinny GEMMs at their real shapes, framework overhead).
# _KERNEL_FLOOR_S: the least time of one kernel: a CUDA launch plus the tail of a small
# grid, ~4-6 us per kernel without CUDA graphs (commonly measured; `alpa-lite profile
# compute` measures yours as the per-operator latency).
# Links are nccl-tests *bus* bandwidths per direction (what a ring collective reaches):
# - NVLink: seed 003 measured 215.6 GB/s all-reduce bus bandwidth on 8 A100-SXM4-80GB
#   (NVLink 3, 300 GB/s per direction nominal): _NVLINK_EFFICIENCY = 215.6 / 300 = 0.72, used
#   for V100 (NVLink 2, 150 GB/s) and H100/H200 (NVLink 4, 450 GB/s) too.
# - InfiniBand: seed 003 measured 12.54 GB/s send/recv between two hosts (one 100 Gb/s
#   port = 12.5 GB/s) and 90.6 GB/s all-reduce bus bandwidth over 4 hosts x 8 GPUs with
#   eight such ports per host (100 GB/s): _IB_EFFICIENCY = 0.9 of the nominal port rate.
#   DGX A100 has 8 x HDR 200 Gb/s ports, DGX H100/H200 8 x NDR 400 Gb/s; a host's ports
#   together are its inter-host bandwidth, shared by the groups of an axis spanning hosts.
# Alphas are typical NCCL small-message latencies (order of magnitude only). Launch
# latencies: a jax dispatch-to-completion of a tiny jitted program (tens of microseconds).

_A100_PEAK = (("float32", 19.5e12), ("tensorfloat32", 156e12), ("bfloat16", 312e12),
              ("float16", 312e12))  # A100 SXM4 datasheet
_H100_PEAK = (("float32", 67e12), ("tensorfloat32", 494.5e12), ("bfloat16", 989.5e12),
              ("float16", 989.5e12))  # H100 SXM5 datasheet (sparse: 989 / 1979 TFLOP/s)
# V100 SXM2 datasheet: 15.7 TFLOP/s fp32, 125 TFLOP/s fp16 tensor cores. It has no bf16
# tensor cores; XLA computes bf16 dots there at about the fp32 rate.
_V100_PEAK = (("float32", 15.7e12), ("bfloat16", 15.7e12), ("float16", 125e12))

_V100_HBM, _A100_80GB_HBM, _H100_HBM, _H200_HBM = 900e9, 2039e9, 3.35e12, 4.8e12
_GPU_LAUNCH_S = 2e-5
_MATMUL_EFFICIENCY = 0.72
_MEMORY_EFFICIENCY = 0.85
_KERNEL_FLOOR_S = 5e-6
_NVLINK_EFFICIENCY = 215.6 / 300
_IB_EFFICIENCY = 0.9


def _nvlink(per_direction_bytes_per_s: float) -> LinkSpec:
    return LinkSpec(alpha_s=1e-5,
                    bandwidth_bytes_per_s=per_direction_bytes_per_s * _NVLINK_EFFICIENCY)


def _network(ports: int, gbit_per_s: float, alpha_s: float = 3e-5,
             efficiency: float = _IB_EFFICIENCY) -> LinkSpec:
    return LinkSpec(alpha_s=alpha_s,
                    bandwidth_bytes_per_s=ports * gbit_per_s * 1e9 / 8 * efficiency)


def _gpu(name: str, kind: str, memory_bytes: float, peak, hbm: float, vector: float,
         intra: LinkSpec, inter: LinkSpec, devices_per_host: int = 8) -> ClusterSpec:
    return ClusterSpec(
        num_hosts=1, devices_per_host=devices_per_host, memory_per_device_bytes=memory_bytes,
        peak_flops_per_s=peak, intra_host=intra, inter_host=inter, device_kind=kind,
        name=name, memory_bandwidth_bytes_per_s=hbm, launch_latency_s=_GPU_LAUNCH_S,
        matmul_efficiency=_MATMUL_EFFICIENCY, memory_efficiency=_MEMORY_EFFICIENCY,
        vector_flops_per_s=vector, kernel_floor_s=_KERNEL_FLOOR_S)


CLUSTER_PRESETS: Mapping[str, ClusterSpec] = types.MappingProxyType({
    # DGX A100 (NVIDIA Selene's nodes): 8 x A100-SXM4-80GB, NVLink 3, 8 x HDR 200 Gb/s.
    "a100-80gb-8x": _gpu("a100-80gb-8x", "NVIDIA A100-SXM4-80GB", 80 * 2**30, _A100_PEAK,
                         _A100_80GB_HBM, 19.5e12, _nvlink(300e9), _network(8, 200)),
    # DGX H100: 8 x H100 SXM5 80GB, NVLink 4, 8 x NDR 400 Gb/s.
    "h100-80gb-8x": _gpu("h100-80gb-8x", "NVIDIA H100 80GB HBM3", 80 * 2**30, _H100_PEAK,
                         _H100_HBM, 67e12, _nvlink(450e9), _network(8, 400)),
    # DGX H200: 8 x H200 SXM 141GB (same compute as H100, 4.8 TB/s HBM3e), 8 x NDR 400 Gb/s.
    "h200-141gb-8x": _gpu("h200-141gb-8x", "NVIDIA H200", 141 * 10**9, _H100_PEAK, _H200_HBM,
                          67e12, _nvlink(450e9), _network(8, 400)),
    # Alpa's paper cluster (AWS p3.8xlarge-like: 4 x V100 16GB, NVLink 2) had 25 Gb/s
    # Ethernet between hosts (TCP: efficiency assumed like IB's, an optimistic guess).
    "v100-16gb-4x": _gpu("v100-16gb-4x", "Tesla V100-SXM2-16GB", 16 * 2**30, _V100_PEAK,
                         _V100_HBM, 15.7e12, _nvlink(150e9), _network(1, 25, alpha_s=1e-4),
                         devices_per_host=4),
    "v100-32gb-4x": _gpu("v100-32gb-4x", "Tesla V100-SXM2-32GB", 32 * 2**30, _V100_PEAK,
                         _V100_HBM, 15.7e12, _nvlink(150e9), _network(1, 100),
                         devices_per_host=4),
    # Seed 001's simulation: 50 nodes x 4 GPUs, 32 GB each. It gives ClusterEnvironment
    # alpha = [1, 1], beta = [1, 0.01] in unstated units (inter-node 100x slower than
    # intra-node); those are not seconds, so this preset uses V100-32GB numbers instead
    # (NVLink 2 inside a node, 100 Gb/s InfiniBand between nodes). For the seed's exact
    # abstract costs use LogicalMesh(shape=(50, 4), alpha_s=(1, 1), beta_s_per_byte=(1, 0.01)).
    "seed-50x4-32gb": dataclasses.replace(
        _gpu("seed-50x4-32gb", "Tesla V100-SXM2-32GB", 32 * 2**30, _V100_PEAK, _V100_HBM,
             15.7e12, _nvlink(150e9), _network(1, 100), devices_per_host=4), num_hosts=50),
    # This repository's test machine: 8 devices simulated on one 2-core CPU host
    # (XLA_FLAGS=--xla_force_host_platform_device_count=8), rounded from the profile in
    # docs/profiling.md: all-reduce etc. fit alpha ~0.7 ms, bus bandwidth ~0.8 GB/s; one device
    # alone reaches ~6e10 fp32 / ~5e10 bf16 flop/s, and the 8 devices share those 2 cores, so
    # each gets about 1/8 of that when all compute. These numbers describe a small VM, nothing
    # else; memory is 2 GiB of the host's 23 GiB per device. `alpa-lite profile compute` here
    # measured 2.7-7.6 GB/s (load-dependent) for a 64 MiB y = 2x pass on one device, which the
    # 8 devices share (~0.6 GB/s each), and 0.11-0.36 ms (median of runs ~0.17 ms) for a
    # trivial program on all 8 devices (6 us on one).
    "cpu-sim": ClusterSpec(
        num_hosts=1, devices_per_host=8, memory_per_device_bytes=2 * 2**30,
        peak_flops_per_s=(("float32", 7.5e9), ("bfloat16", 6e9)),
        memory_bandwidth_bytes_per_s=0.6e9, launch_latency_s=1.7e-4, shared_host_compute=True,
        intra_host=LinkSpec(alpha_s=7e-4, bandwidth_bytes_per_s=0.8e9),
        inter_host=LinkSpec(alpha_s=7e-4, bandwidth_bytes_per_s=0.8e9),
        device_kind="cpu", name="cpu-sim"),
})

# device_kind substring -> preset whose flops and links a live device of that kind gets.
_KIND_TEMPLATES = (("H100", "h100-80gb-8x"), ("H200", "h200-141gb-8x"),
                   ("A100", "a100-80gb-8x"), ("V100", "v100-32gb-4x"))
_PLATFORM_TEMPLATES = {"cpu": "cpu-sim", "gpu": "a100-80gb-8x", "cuda": "a100-80gb-8x",
                       "rocm": "a100-80gb-8x", "tpu": "a100-80gb-8x"}


def get_cluster_preset(name: str) -> ClusterSpec:
    """A preset cluster by name (see `CLUSTER_PRESETS`).

    Example:
        >>> get_cluster_preset("seed-50x4-32gb").num_devices
        200
    """
    if name not in CLUSTER_PRESETS:
        raise InvalidConfigError(
            f"Unknown cluster preset {name!r}; presets: {sorted(CLUSTER_PRESETS)}. Or load a "
            "JSON file with ClusterSpec.load(path).")
    return CLUSTER_PRESETS[name]
