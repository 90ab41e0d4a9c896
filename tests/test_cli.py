"""The alpa-lite command line: cluster show, profile comm/compute, --devices, import hygiene."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import alpa_lite
from alpa_lite import cli
from alpa_lite.cluster import ClusterSpec, get_cluster_preset
from alpa_lite.profiling import ProfileDatabase

REPO = pathlib.Path(alpa_lite.__file__).parent.parent


@pytest.fixture
def restore_env(monkeypatch):
    """--devices writes XLA_FLAGS / JAX_PLATFORMS; put them back after the test."""
    for name in ("XLA_FLAGS", "JAX_PLATFORMS"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


def test_cluster_show_preset(capsys):
    assert cli.main(["cluster", "show", "seed-50x4-32gb"]) == 0
    out = capsys.readouterr().out
    assert "50 host(s) x 4 = 200" in out and "32 GiB" in out


def test_cluster_show_file_as_json_round_trips(tmp_path, capsys):
    path = tmp_path / "cluster.json"
    get_cluster_preset("v100-16gb-4x").with_hosts(3).save(path)
    assert cli.main(["cluster", "show", str(path), "--json"]) == 0
    assert ClusterSpec.from_json(capsys.readouterr().out) == ClusterSpec.load(path)


def test_cluster_show_unknown_lists_presets(capsys):
    assert cli.main(["cluster", "show", "dgx"]) == 2
    assert "presets: ['a100-80gb-8x'" in capsys.readouterr().err


def test_bad_max_bytes_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["profile", "comm", "--max-bytes", "lots"])
    assert "byte count" in capsys.readouterr().err


def test_profile_comm_then_compute_fill_one_database(tmp_path, capsys, restore_env):
    out = tmp_path / "db.json"
    assert cli.main(["profile", "comm", "--devices", "8", "--max-bytes", "2KiB", "--kinds",
                     "all-reduce,send-recv", "--group-sizes", "8", "--repeats", "1",
                     "--no-progress", "--out", str(out)]) == 0
    assert "# all-reduce: 1 group(s) of 8 devices, intra-host" in capsys.readouterr().out
    assert cli.main(["profile", "compute", "--dtypes", "float32", "--sizes", "32",
                     "--repeats", "1", "--bandwidth-bytes", "64KiB", "--launch-repeats", "3",
                     "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "TFLOP/s" in printed and "launch latency" in printed and "GB/s" in printed
    db = ProfileDatabase.load(out)
    assert len(db.collectives) == 4 and len(db.matmuls) == 1
    assert [r.num_devices for r in db.launches if r.kind == "program"] == [1, len(jax.devices())]
    assert {r.num_devices for r in db.launches if r.kind == "operator"} == {1, 4, 8}
    assert [r.num_bytes for r in db.memory_bandwidths] == [2 * 64 * 1024]
    assert dict(db.metadata)["num_devices"] == str(len(jax.devices()))


def test_devices_flag_after_backend_started_explains(capsys, restore_env):
    assert cli.main(["profile", "compute", "--devices", "3", "--sizes", "8"]) == 2
    assert "already started with 8 cpu device(s)" in capsys.readouterr().err


def test_with_device_count_replaces_the_flag():
    flags = "--xla_foo=1 --xla_force_host_platform_device_count=8"
    assert cli.with_device_count(flags, 4) == (
        "--xla_foo=1 --xla_force_host_platform_device_count=4")


def test_subcommands_are_registered_in_one_place():
    assert len(cli._COMMANDS) >= 2
    parser = cli.build_parser()
    assert parser.parse_args(["cluster", "show", "cpu-sim"]).handler is cli._run_cluster_show
    assert parser.parse_args(["profile", "comm"]).handler is cli._run_profile_comm


def test_cli_module_does_not_import_jax_at_top_level():
    tree = ast.parse((REPO / "alpa_lite" / "cli.py").read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = {alias.name for node in top if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in top if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "jax" for name in names), names
    env = {"JAX_PLATFORMS": "bogus", "PATH": "/usr/bin:/bin"}
    code = "import alpa_lite.cli as c; c.build_parser(); print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_profile_comm_in_a_fresh_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(
        [sys.executable, "-m", "alpa_lite.cli", "profile", "comm", "--devices", "8",
         "--max-bytes", "65536", "--repeats", "1", "--out", "tmp.json"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "busbw" in done.stdout and "1 group(s) of 8 devices" in done.stdout
    data = json.loads((tmp_path / "tmp.json").read_text())
    assert data["metadata"]["num_devices"] == "8"
    sizes = {row["num_bytes"] for row in data["collectives"]}
    assert min(sizes) == 1024 and max(sizes) == 65536
    assert {row["kind"] for row in data["collectives"]} == {
        "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send-recv"}


def test_profile_says_when_its_measurements_scatter(capsys, restore_env):
    # with a zero tolerance any two repeats that differ at all are scatter
    assert cli.main(["profile", "compute", "--dtypes", "float32", "--sizes", "32",
                     "--repeats", "3", "--bandwidth-bytes", "64KiB", "--launch-repeats", "5",
                     "--no-progress", "--max-scatter", "0"]) == 0
    err = capsys.readouterr().err
    assert "measurements varied by more than +-0% between repeats" in err
    assert "Measure again on an idle machine" in err
