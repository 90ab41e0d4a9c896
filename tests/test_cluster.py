"""ClusterSpec: validation, parsing, presets, JSON, live devices and the logical-mesh bridge."""

import dataclasses

import jax
import pytest

from alpa_lite.cluster import (CLUSTER_PRESETS, ClusterSpec, LinkSpec, get_cluster_preset,
                               parse_bytes, parse_cluster_string)
from alpa_lite.errors import InvalidConfigError
from alpa_lite.mesh import LogicalMesh
from alpa_lite.profiling.database import CollectiveRow, ProfileDatabase

INTRA = LinkSpec(alpha_s=1e-5, bandwidth_bytes_per_s=200e9)
INTER = LinkSpec(alpha_s=4e-5, bandwidth_bytes_per_s=25e9)


def make_spec(**changes):
    kw = dict(num_hosts=2, devices_per_host=8, memory_per_device_bytes=2**30,
              peak_flops_per_s={"float32": 1e13, "bfloat16": 1e14}, intra_host=INTRA,
              inter_host=INTER, device_kind="test")
    kw.update(changes)
    return ClusterSpec(**kw)


@pytest.mark.parametrize("text, expected", [("50x4", (50, 4)), ("1x8", (1, 8)),
                                            (" 2 X 16 ", (2, 16))])
def test_parse_cluster_string_reads_hosts_by_devices(text, expected):
    assert parse_cluster_string(text) == expected


@pytest.mark.parametrize("text", ["50*4", "0x4", "4x0", "x", "", "4x", "-1x4", "2x2x2"])
def test_parse_cluster_string_names_the_format(text):
    with pytest.raises(InvalidConfigError, match=r"HOSTSxDEVICES.*'50x4'"):
        parse_cluster_string(text)


@pytest.mark.parametrize("text, expected", [
    ("1024", 1024), (1024, 1024), ("32GiB", 32 * 2**30), ("32GB", 32 * 10**9),
    ("1.5TiB", int(1.5 * 2**40)), ("512M", 512 * 2**20), ("64kib", 65536), ("2 MB", 2 * 10**6)])
def test_parse_bytes_binary_and_si_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12QB", "1.2.3GB", "-5GB"])
def test_parse_bytes_rejects_garbage(text):
    with pytest.raises(InvalidConfigError, match="byte count"):
        parse_bytes(text)


@pytest.mark.parametrize("changes, match", [
    (dict(memory_per_device_bytes=0), "memory_per_device_bytes must be a positive"),
    (dict(memory_per_device_bytes=-5), "got -5"),
    (dict(num_hosts=0), "num_hosts must be a positive integer"),
    (dict(devices_per_host=2.5), "devices_per_host must be a positive integer"),
    (dict(peak_flops_per_s={}), "peak_flops_per_s must map"),
    (dict(peak_flops_per_s={"float32": -1.0}), "bad"),
    (dict(intra_host=(1e-5, 1e9)), "intra_host must be a LinkSpec"),
])
def test_cluster_spec_validation_says_what_and_how(changes, match):
    with pytest.raises(InvalidConfigError, match=match):
        make_spec(**changes)


def test_link_spec_rejects_zero_bandwidth():
    with pytest.raises(InvalidConfigError, match="bandwidth_bytes_per_s must be positive"):
        LinkSpec(alpha_s=0.0, bandwidth_bytes_per_s=0.0)


def test_cluster_spec_is_hashable_and_peak_pairs_sorted():
    spec = make_spec()
    assert hash(spec) == hash(make_spec())
    assert spec.peak_flops_per_s == (("bfloat16", 1e14), ("float32", 1e13))
    assert spec.peak_flops("bf16") == 1e14 and spec.peak_flops() == 1e13
    with pytest.raises(InvalidConfigError, match=r"float16.*\['bfloat16', 'float32'\]"):
        spec.peak_flops("float16")


def test_json_round_trip_with_profile(tmp_path):
    db = ProfileDatabase(collectives=(
        CollectiveRow(kind="all-reduce", group_size=8, num_bytes=1024, time_s=2e-5),))
    spec = make_spec(profile=db, name="mine", shared_host_compute=True)
    assert ClusterSpec.from_json(spec.to_json()) == spec
    spec.save(tmp_path / "c.json")
    assert ClusterSpec.load(tmp_path / "c.json") == spec


def test_load_errors_are_explained(tmp_path):
    with pytest.raises(InvalidConfigError, match="does not exist.*preset"):
        ClusterSpec.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format_version": 1, "hosts": 3}')
    with pytest.raises(InvalidConfigError, match="unexpected keys \\['hosts'\\]"):
        ClusterSpec.load(tmp_path / "bad.json")


def test_presets_are_valid_and_named():
    assert {"a100-80gb-8x", "h100-80gb-8x", "v100-16gb-4x", "v100-32gb-4x", "seed-50x4-32gb",
            "cpu-sim"} <= set(CLUSTER_PRESETS)
    for name, spec in CLUSTER_PRESETS.items():
        assert spec.name == name
        # a device's share of its host's network is slower than its intra-host link
        assert spec.intra_host.bandwidth_bytes_per_s >= (
            spec.inter_host.bandwidth_bytes_per_s / spec.devices_per_host)
    seed = get_cluster_preset("seed-50x4-32gb")
    assert (seed.num_hosts, seed.devices_per_host, seed.memory_per_device_bytes) == (
        50, 4, 32 * 2**30)
    assert get_cluster_preset("a100-80gb-8x").peak_flops("bfloat16") == 312e12


def test_unknown_preset_lists_the_names():
    with pytest.raises(InvalidConfigError, match="a100-80gb-8x.*seed-50x4-32gb"):
        get_cluster_preset("a100")


def test_overrides_return_new_specs():
    spec = get_cluster_preset("v100-32gb-4x")
    assert spec.with_hosts(16).num_devices == 64
    assert spec.with_memory("16GiB").memory_per_device_bytes == 16 * 2**30
    assert spec.num_hosts == 1
    with pytest.raises(InvalidConfigError, match="num_hosts"):
        spec.with_hosts(0)


# share: of a host's network, what one group of the axis spanning hosts gets (its devices on
# a host over the host's 8: all groups of the axis run at once)
@pytest.mark.parametrize("logical_shape, links, share", [
    ((2, 8), ("inter", "intra"), 1 / 8), ((4, 4), ("inter", "intra"), 2 / 8),
    ((16, 1), ("inter", "intra"), 1.0), ((1, 16), ("intra", "inter"), 1.0),
    ((16,), ("inter",), 1.0), ((8, 2), ("inter", "intra"), 4 / 8)])
def test_logical_mesh_axis_spanning_hosts_gets_inter_link(logical_shape, links, share):
    mesh = make_spec().logical_mesh((2, 8), logical_shape)
    assert mesh.shape == logical_shape and mesh.axis_links == links
    for link, alpha, beta in zip(links, mesh.alpha_s, mesh.beta_s_per_byte):
        expected, part = (INTER, share) if link == "inter" else (INTRA, 1.0)
        assert alpha == expected.alpha_s
        assert beta == pytest.approx(1 / (expected.bandwidth_bytes_per_s * part))
    assert mesh.memory_per_device_bytes == 2**30 and mesh.peak_flops_per_s == 1e13


def test_logical_mesh_within_one_host_is_all_intra():
    mesh = make_spec().logical_mesh((1, 8), (2, 4), dtype="bfloat16")
    assert mesh.axis_links == ("intra", "intra") and mesh.peak_flops_per_s == 1e14
    # Groups of 2 hosts x 4 devices: rows of 4 stay on a host, columns cross hosts.
    assert make_spec().logical_mesh((2, 4), (2, 4)).axis_links == ("inter", "intra")


def test_logical_mesh_carries_the_profile():
    db = ProfileDatabase(collectives=(
        CollectiveRow(kind="all-reduce", group_size=2, num_bytes=1024, time_s=1e-5),))
    mesh = make_spec(profile=db).logical_mesh((2, 8), (2, 8))
    assert mesh.profile is db
    assert LogicalMesh.from_dict(mesh.to_dict()) == mesh


@pytest.mark.parametrize("submesh, logical, match", [
    ((3, 8), (24,), "1 <= hosts <= 2"), ((1, 16), (16,), "1 <= devices <= 8"),
    ((2, 8), (4, 2), "holding the submesh's 16 devices"), ((2, 8), (2, 2, 4), "1 or 2")])
def test_logical_mesh_rejects_bad_shapes(submesh, logical, match):
    with pytest.raises(InvalidConfigError, match=match):
        make_spec().logical_mesh(submesh, logical)


def test_enumerate_submesh_shapes_follows_alpa():
    assert make_spec().enumerate_submesh_shapes() == ((1, 1), (1, 2), (1, 4), (1, 8), (2, 8))


def test_from_devices_reads_the_live_cpu_devices():
    spec = ClusterSpec.from_devices()
    assert (spec.num_hosts, spec.devices_per_host) == (1, len(jax.devices()))
    assert spec.device_kind == jax.devices()[0].device_kind
    assert spec.memory_per_device_bytes > 0
    assert spec.logical_mesh((1, 8), (2, 4)).num_devices == 8


def test_from_devices_with_profile_fits_the_links():
    rows = tuple(CollectiveRow(kind="all-reduce", group_size=8, num_bytes=b,
                               time_s=1e-5 + 1.75 * b / 50e9) for b in (2**10, 2**16, 2**20))
    spec = ClusterSpec.from_devices(jax.devices(), profile=ProfileDatabase(collectives=rows))
    assert spec.intra_host.alpha_s == pytest.approx(1e-5)
    assert spec.intra_host.bandwidth_bytes_per_s == pytest.approx(50e9)
    assert spec.inter_host == get_cluster_preset("cpu-sim").inter_host  # not measured: kept


def test_describe_mentions_devices_and_links():
    text = dataclasses.replace(get_cluster_preset("h100-80gb-8x"), num_hosts=2).describe()
    assert "2 host(s) x 8 = 16" in text and "323 GB/s" in text and "80 GiB" in text
