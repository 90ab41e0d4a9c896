"""Profile database (interpolation, fits, JSON), its use by the cost model, and real profiling."""

import functools
import json

import jax
import jax.numpy as jnp
import pytest

from alpa_lite.cluster import ClusterSpec, LinkSpec
from alpa_lite.cost.collectives import Collective, estimate_collective_s
from alpa_lite.errors import InvalidConfigError
from alpa_lite.mesh import LogicalMesh
from alpa_lite.profiling import (COLLECTIVE_KINDS, CollectiveRow, LaunchRow, MatmulRow,
                                 MemoryBandwidthRow, ProfileDatabase, bus_bandwidth_factor)
from alpa_lite.profiling.comm import (default_message_sizes, format_collective_table,
                                      profile_collectives)
from alpa_lite.profiling.compute import (format_launch_and_memory, format_matmul_table,
                                        profile_launch_latency, profile_matmul,
                                        profile_memory_bandwidth)


def ar(group_size, num_bytes, time_s, link="intra", kind="all-reduce"):
    return CollectiveRow(kind=kind, group_size=group_size, num_bytes=num_bytes, time_s=time_s,
                         link=link)


# Measured points: (1 KiB, 10 us), (1 MiB, 110 us), (4 MiB, 410 us) for all-reduce on 4.
CURVE = (ar(4, 1024, 10e-6), ar(4, 2**20, 110e-6), ar(4, 4 * 2**20, 410e-6))
DB = ProfileDatabase(collectives=CURVE, metadata=(("device_kind", "test"),))


@pytest.mark.parametrize("kind, n, factor", [
    ("all-reduce", 8, 1.75), ("all-gather", 8, 0.875), ("reduce-scatter", 4, 0.75),
    ("all-to-all", 2, 0.5), ("send-recv", 2, 1.0), ("all-reduce", 1, 0.0)])
def test_bus_bandwidth_factor_follows_nccl_tests(kind, n, factor):
    assert bus_bandwidth_factor(kind, n) == factor


def test_row_bandwidths():
    row = ar(8, 2 * 10**9, 0.01623)  # seed 003: 8 A100s, 2 GB all-reduce, 215.6 GB/s busbw
    assert row.algbw_bytes_per_s == pytest.approx(123.2e9, rel=1e-3)
    assert row.busbw_bytes_per_s == pytest.approx(215.6e9, rel=1e-3)


def test_rows_validate_their_fields():
    with pytest.raises(InvalidConfigError, match="Unknown collective kind 'allreduce'"):
        ar(4, 1024, 1e-5, kind="allreduce")
    with pytest.raises(InvalidConfigError, match=r"link class 'ib'.*\['intra', 'inter'\]"):
        ar(4, 1024, 1e-5, link="ib")
    with pytest.raises(InvalidConfigError, match="time_s must be a positive"):
        ar(4, 1024, 0.0)


def test_database_json_round_trip_keeps_equality_and_hash(tmp_path):
    db = DB.replace(matmuls=(MatmulRow(dtype="float32", m=64, n=64, k=64, time_s=1e-4),))
    db.save(tmp_path / "db.json")
    loaded = ProfileDatabase.load(tmp_path / "db.json")
    assert loaded == db and hash(loaded) == hash(db)
    assert json.loads(db.to_json())["format_version"] == 1


def test_database_load_errors(tmp_path):
    with pytest.raises(InvalidConfigError, match="does not exist.*alpa-lite profile comm"):
        ProfileDatabase.load(tmp_path / "nope.json")
    with pytest.raises(InvalidConfigError, match="format_version 7"):
        ProfileDatabase.from_dict({"format_version": 7})
    with pytest.raises(InvalidConfigError, match="unexpected or missing fields"):
        ProfileDatabase.from_dict({"format_version": 1, "collectives": [{"kind": "all-reduce"}]})


@pytest.mark.parametrize("row", CURVE)
def test_interpolation_is_exact_at_measured_points(row):
    assert DB.collective_time_s("all-reduce", 4, row.num_bytes) == row.time_s


def test_interpolation_is_linear_between_points():
    midpoint = (2**20 + 4 * 2**20) / 2
    assert DB.collective_time_s("all-reduce", 4, midpoint) == pytest.approx(260e-6)


def test_extrapolation_uses_last_bandwidth_above_and_latency_below():
    assert DB.collective_time_s("all-reduce", 4, 8 * 2**20) == pytest.approx(820e-6)
    assert DB.collective_time_s("all-reduce", 4, 10) == 10e-6
    assert DB.collective_time_s("all-reduce", 1, 2**20) == 0.0


def test_unmeasured_group_size_uses_nearest_group_at_equal_bus_bytes():
    # Group 8 is nearest to measured 4; 2(n-1)/n: 1.75 vs 1.5, so 1 MiB on 8 moves the bus
    # bytes of 1.75/1.5 MiB on 4.
    expected = DB.collective_time_s("all-reduce", 4, 2**20 * 1.75 / 1.5)
    assert DB.collective_time_s("all-reduce", 8, 2**20) == pytest.approx(expected)


def test_unmeasured_kind_falls_back_to_the_alpha_beta_fit():
    alpha, beta = DB.fit_alpha_beta("intra")
    expected = alpha + beta * 0.75 * 2**20
    assert DB.collective_time_s("all-gather", 4, 2**20) == pytest.approx(expected)


def test_unmeasured_link_raises_and_has_link_says_so():
    assert DB.has_link("intra") and not DB.has_link("inter")
    with pytest.raises(InvalidConfigError, match="no collective measured on the 'inter' link"):
        DB.collective_time_s("all-reduce", 4, 1024, link="inter")


def test_fit_alpha_beta_recovers_a_linear_model():
    alpha, bandwidth = 20e-6, 80e9
    rows = [CollectiveRow(kind=kind, group_size=n, num_bytes=b, link="inter",
                          time_s=alpha + bus_bandwidth_factor(kind, n) * b / bandwidth)
            for kind in COLLECTIVE_KINDS for n in (2, 8) for b in (2**10, 2**18, 2**26)]
    fit = ProfileDatabase(collectives=tuple(rows)).fit_alpha_beta("inter")
    assert fit == pytest.approx((alpha, 1 / bandwidth), rel=1e-6)


def test_matmul_throughput_interpolates_in_log_flops():
    rows = (MatmulRow(dtype="bfloat16", m=128, n=128, k=128, time_s=2 * 128**3 / 1e12),
            MatmulRow(dtype="bfloat16", m=512, n=512, k=512, time_s=2 * 512**3 / 4e12))
    db = ProfileDatabase(matmuls=rows)
    assert db.matmul_flops_per_s("bfloat16", 2 * 128**3) == pytest.approx(1e12)
    assert db.matmul_flops_per_s("bfloat16", 2 * 256**3) == pytest.approx(2.5e12)
    assert db.matmul_flops_per_s("bfloat16", 1e15) == pytest.approx(4e12)
    with pytest.raises(InvalidConfigError, match=r"'float16'.*\['bfloat16'\]"):
        db.matmul_flops_per_s("float16", 1e9)


def test_estimate_collective_s_without_profile_is_unchanged():
    mesh = LogicalMesh(shape=(4,), alpha_s=(1.0,), beta_s_per_byte=(1.0,))
    assert estimate_collective_s(Collective.ALL_REDUCE, mesh, ("x",), 100.0) == 151.01


def test_estimate_collective_s_uses_the_profile_plus_tie_breaker():
    plain = LogicalMesh(shape=(4, 2), alpha_s=(1e-6, 1e-6), beta_s_per_byte=(1e-9, 1e-9))
    profiled = LogicalMesh(shape=(4, 2), alpha_s=(1e-6, 1e-6), beta_s_per_byte=(1e-9, 1e-9),
                           profile=DB)
    got = estimate_collective_s(Collective.ALL_REDUCE, profiled, ("x",), 2**20)
    assert got == pytest.approx(110e-6 + 0.01 * 1e-6)
    assert got != estimate_collective_s(Collective.ALL_REDUCE, plain, ("x",), 2**20)
    assert estimate_collective_s(Collective.ALL_REDUCE, profiled, ("y",), 0.0) > 0


def test_profile_without_rows_for_the_link_falls_back_to_alpha_beta():
    spec = ClusterSpec(num_hosts=2, devices_per_host=4, memory_per_device_bytes=2**30,
                       peak_flops_per_s={"float32": 1e12},
                       intra_host=LinkSpec(alpha_s=1e-5, bandwidth_bytes_per_s=1e11),
                       inter_host=LinkSpec(alpha_s=1e-4, bandwidth_bytes_per_s=1e10), profile=DB)
    mesh = spec.logical_mesh((2, 4), (2, 4))
    plain = LogicalMesh(shape=(2, 4), alpha_s=mesh.alpha_s, beta_s_per_byte=mesh.beta_s_per_byte)
    inter = estimate_collective_s(Collective.ALL_GATHER, mesh, ("x",), 2**20)
    assert inter == estimate_collective_s(Collective.ALL_GATHER, plain, ("x",), 2**20)
    intra = estimate_collective_s(Collective.ALL_REDUCE, mesh, ("y",), 2**20)
    assert intra == pytest.approx(110e-6 + 0.01 * 1e-5)
    both = estimate_collective_s(Collective.ALL_REDUCE, mesh, ("x", "y"), 2**20)
    assert both == estimate_collective_s(Collective.ALL_REDUCE, plain, ("x", "y"), 2**20)


def test_mesh_with_profile_is_a_cache_key():
    calls = []

    @functools.lru_cache
    def cached(mesh):
        calls.append(mesh)
        return mesh.num_devices

    mesh = LogicalMesh(shape=(4,), profile=DB, axis_links=("intra",))
    twin = LogicalMesh(shape=(4,), profile=ProfileDatabase.from_json(DB.to_json()),
                       axis_links=("intra",))
    assert cached(mesh) == cached(twin) == 4 and len(calls) == 1


def test_mesh_axis_links_are_validated():
    with pytest.raises(InvalidConfigError, match=r"axis_links needs one of \['intra', 'inter'\]"):
        LogicalMesh(shape=(2, 4), axis_links=("intra", "ib"))


def test_default_message_sizes_start_at_1kib():
    assert default_message_sizes(2**12) == (1024, 2048, 4096)
    with pytest.raises(InvalidConfigError, match="max_bytes=512"):
        default_message_sizes(512)


def test_real_profile_on_cpu_devices_gives_sane_rows():
    devices = jax.devices()[:8]
    rows = profile_collectives(devices, sizes=(1024, 8192), group_sizes=(2, 8), repeats=1)
    assert {(r.kind, r.group_size) for r in rows} == {
        (k, n) for k in COLLECTIVE_KINDS for n in (2, 8)}
    for r in rows:
        assert r.time_s > 0 and r.link == "intra" and r.num_groups == 8 // r.group_size
        assert r.num_bytes in (1024, 8192)
        assert r.busbw_bytes_per_s == pytest.approx(
            r.num_bytes / r.time_s * bus_bandwidth_factor(r.kind, r.group_size))
    table = format_collective_table(rows)
    assert "# all-reduce: 1 group(s) of 8 devices, intra-host" in table and "busbw" in table
    db = ProfileDatabase(collectives=rows)
    assert db.collective_time_s("all-gather", 8, 8192) == next(
        r.time_s for r in rows if (r.kind, r.group_size, r.num_bytes) == ("all-gather", 8, 8192))


def test_profile_collectives_rejects_bad_kinds_and_groups():
    with pytest.raises(InvalidConfigError, match="Unknown collective kinds \\['allreduce'\\]"):
        profile_collectives(kinds=("allreduce",), sizes=(1024,))
    with pytest.raises(InvalidConfigError, match=r"\[3\] do not divide the 8 devices"):
        profile_collectives(group_sizes=(3,), sizes=(1024,))


def test_real_matmul_profile_on_cpu():
    rows = profile_matmul(dtypes=("float32",), sizes=(32, 64), repeats=1)
    assert [r.m for r in rows] == [32, 64] and all(r.flops_per_s > 0 for r in rows)
    assert "TFLOP/s" in format_matmul_table(rows)


LAUNCHES = (LaunchRow(num_devices=8, time_s=1e-4), LaunchRow(num_devices=1, time_s=7e-6))
BANDWIDTHS = (MemoryBandwidthRow(num_bytes=2**27, time_s=0.02),
              MemoryBandwidthRow(num_bytes=2**23, time_s=1e-3))


def test_database_with_launch_and_memory_rows_round_trips(tmp_path):
    db = DB.replace(launches=LAUNCHES, memory_bandwidths=BANDWIDTHS)
    db.save(tmp_path / "db.json")
    loaded = ProfileDatabase.load(tmp_path / "db.json")
    assert loaded == db and hash(loaded) == hash(db) and hash(db) != hash(DB)
    assert [r.num_devices for r in loaded.launches] == [1, 8]
    assert loaded.launch_latency_s(8) == 1e-4
    assert loaded.launch_latency_s(2) == pytest.approx(7e-6 + (1e-4 - 7e-6) / 7)  # interpolated
    assert loaded.memory_bandwidth_bytes_per_s() == pytest.approx(2**27 / 0.02)


def test_old_database_without_launch_and_memory_sections_loads():
    data = json.loads(DB.to_json())
    del data["launches"], data["memory_bandwidths"]
    old = ProfileDatabase.from_dict(data)
    assert old == DB
    assert old.launch_latency_s() is None and old.memory_bandwidth_bytes_per_s() is None


def test_launch_and_memory_rows_validate_their_fields():
    with pytest.raises(InvalidConfigError, match="num_devices must be a positive"):
        LaunchRow(num_devices=0, time_s=1e-5)
    with pytest.raises(InvalidConfigError, match="time_s must be a positive"):
        MemoryBandwidthRow(num_bytes=8, time_s=0.0)
    with pytest.raises(InvalidConfigError, match="launch rows with"):
        ProfileDatabase.from_dict({"format_version": 1, "launches": [{"devices": 1}]})


def test_real_launch_latency_on_one_device_and_on_all():
    rows = profile_launch_latency(repeats=3)
    n = len(jax.devices())
    assert [(r.num_devices, r.kind) for r in rows] == [
        (1, "program"), (n, "program"), (1, "operator"), (n // 2, "operator"), (n, "operator")]
    assert all(0 < r.time_s < 1.0 for r in rows)
    db = ProfileDatabase(launches=rows)
    assert db.op_latency_s(n) > 0 and db.launch_latency_s(n) == rows[1].time_s


def test_real_memory_bandwidth_on_cpu():
    rows = profile_memory_bandwidth(array_bytes=(4096, 2**16 + 2), repeats=1)
    assert [r.num_bytes for r in rows] == [8192, 2**17]  # read + write, whole float32s
    assert all(r.bytes_per_s > 0 for r in rows)
    text = format_launch_and_memory(profile_launch_latency(jax.devices()[:1], repeats=1), rows)
    assert "launch latency" in text and "GB/s" in text
    with pytest.raises(InvalidConfigError, match="at least 4 bytes"):
        profile_memory_bandwidth(array_bytes=(2,))


def test_memory_bandwidth_is_one_pass_of_a_loop_in_place(monkeypatch):
    """One pass into a fresh buffer timed the first touch of its pages (7.7 against 24.4
    GB/s in place on one simulated CPU device): the row is one pass of a loop of them."""
    from alpa_lite.profiling import compute

    programs = []

    def timed(fn, x, repeats):
        programs.append(str(fn.lower(x).as_text()))
        return 0.08

    monkeypatch.setattr(compute, "run_timed", timed)
    (row,) = compute.profile_memory_bandwidth(array_bytes=(4096,), repeats=1)
    assert row.time_s == pytest.approx(0.08 / compute.BANDWIDTH_PASSES)
    assert "while" in programs[0]  # the passes loop inside one program


def test_timing_scatter_counts_the_measurements_whose_repeats_vary():
    from alpa_lite.profiling.compute import TimingScatter, run_timed, timing_scatter

    scatter = TimingScatter(threshold=0.2)
    scatter.add([1.0, 1.0, 1.0])
    assert scatter.warning() is None
    scatter.add([1.0, 1.0, 2.0])  # range 1 over median 1: +-50 %
    assert scatter.spreads == [0.0, 0.5]
    assert "1 of 2 measurements varied by more than +-20% between repeats (worst +-50%)" in \
        scatter.warning()
    with timing_scatter() as inside:
        run_timed(jax.jit(lambda x: x + 1), jnp.ones(4), repeats=3)
    assert len(inside.spreads) == 1
    run_timed(jax.jit(lambda x: x + 1), jnp.ones(4), repeats=2)  # outside: not collected
    assert len(inside.spreads) == 1


@pytest.mark.parametrize("kind", ["all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                  "send-recv"])
def test_collective_chains_keep_their_shape(kind):
    """A row's time is the slope to a chain of collectives in one program: every chain
    must run on its own result, at the shape it started with."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from alpa_lite.profiling.comm import _build_collective

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("group", "member"))
    x = jax.device_put(jnp.ones((1, 4, 8), jnp.float32),
                       NamedSharding(mesh, P("group", "member", None)))
    out = _build_collective(kind, mesh, 3)(x)
    assert out.shape == x.shape
    # side by side: one collective on each input, each output its collective's own
    outs = _build_collective(kind, mesh, 3, side_by_side=True)(x, x + 1, x + 2)
    assert len(outs) == 3 and all(
        o.shape == _build_collective(kind, mesh, 1)(x).shape for o in outs)
    if kind == "all-reduce":  # each sums its own input over the 4 members
        assert [float(o[0, 0, 0]) for o in outs] == [4.0, 8.0, 12.0]


def test_collective_times_never_fall_as_messages_grow():
    from alpa_lite.profiling.comm import monotone_in_size

    rows = [CollectiveRow(kind="all-reduce", group_size=4, num_bytes=b, time_s=t, link="intra")
            for b, t in ((1024, 9e-4), (2048, 2e-4), (4096, 3e-4), (8192, 1e-3))]
    assert [r.time_s for r in monotone_in_size(rows)] == [2e-4, 2e-4, 3e-4, 1e-3]
