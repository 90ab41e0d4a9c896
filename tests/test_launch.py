"""`alpa-lite launch` (no jax in the children: plain Python commands) and
`alpa_lite.distributed.initialize` in one process."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from alpa_lite import distributed
from alpa_lite.errors import InvalidConfigError
from alpa_lite.launch import Launcher, process_environment
from alpa_lite.inter_op.assignment import place_stages

PY = sys.executable


def run_launcher(code: str, n: int = 2, **kwargs) -> tuple[int, str]:
    out = io.StringIO()
    status = Launcher([PY, "-c", code], n, out=out, **kwargs).run()
    return status, out.getvalue()


def test_every_process_gets_its_index_and_prefixed_output():
    status, output = run_launcher(
        "import os; print(os.environ['ALPA_LITE_PROCESS_ID'], "
        "os.environ['ALPA_LITE_NUM_PROCESSES'], os.environ['ALPA_LITE_COORDINATOR'])", n=3)
    assert status == 0
    lines = sorted(output.splitlines())
    assert [line.split()[:3] for line in lines] == [
        ["[0]", "0", "3"], ["[1]", "1", "3"], ["[2]", "2", "3"]]
    assert len({line.split()[3] for line in lines}) == 1  # one coordinator for all


def test_devices_per_process_sets_cpu_devices():
    env = process_environment({"XLA_FLAGS": "--xla_foo=1"}, process_id=1, num_processes=2,
                              coordinator="h:1", devices_per_process=4)
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["ALPA_LITE_PROCESS_ID"] == "1"


def test_a_failing_process_ends_the_others_with_sigkill_after_the_grace_period(tmp_path):
    pid_file = tmp_path / "pid"
    code = (
        "import os, signal, sys, time\n"
        "if os.environ['ALPA_LITE_PROCESS_ID'] == '0':\n"
        "    time.sleep(0.5); sys.exit(5)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as jax does\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n")
    start = time.monotonic()
    status, output = run_launcher(code, grace_period_s=1.0)
    assert status == 5
    assert time.monotonic() - start < 30
    assert "process 0 exited with status 5; ending the others" in output
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_a_peer_failing_too_reports_its_error_before_it_is_ended():
    # e.g. a plan mismatch: every process raises, and process 0 may exit first
    code = (
        "import os, sys, time\n"
        "if os.environ['ALPA_LITE_PROCESS_ID'] == '0':\n"
        "    sys.exit(5)\n"
        "time.sleep(1.0); print('my own error', flush=True); sys.exit(1)\n")
    status, output = run_launcher(code, grace_period_s=5.0)
    assert status == 5
    assert "[1] my own error" in output  # not SIGTERMed before it could say it


def test_a_killed_process_gives_128_plus_the_signal():
    status, output = run_launcher(
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", n=1)
    assert status == 128 + signal.SIGKILL
    assert "killed by SIGKILL" in output


def _start_launcher(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["timeout", "-s", "KILL", "60", PY, "-m", "alpa_lite.cli", "launch",
         "--num-processes", "2", "--grace-period", "2", "--", PY, "-c", code],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_ctrl_c_is_forwarded_to_every_process():
    code = ("import time\n"
            "try:\n    print('ready', flush=True); time.sleep(60)\n"
            "except KeyboardInterrupt:\n    print('interrupted', flush=True); raise\n")
    launcher = _start_launcher(code)
    try:
        ready = 0
        while ready < 2:
            ready += "ready" in launcher.stdout.readline()
        launcher.send_signal(signal.SIGINT)
        output = launcher.communicate(timeout=30)[0]
    finally:
        launcher.kill()
        launcher.wait()
    assert "[0] interrupted" in output and "[1] interrupted" in output
    assert launcher.returncode != 0


def test_children_die_with_a_killed_launcher():
    launcher = subprocess.Popen(
        [PY, "-m", "alpa_lite.cli", "launch", "--num-processes", "1", "--", PY, "-c",
         "import os, time; print(os.getpid(), flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        child = int(launcher.stdout.readline().split()[1])
        launcher.kill()  # SIGKILL: the launcher cannot clean up
        launcher.wait()
        for _ in range(100):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child outlived its launcher")
    finally:
        launcher.kill()
        launcher.wait()
        launcher.stdout.close()


@pytest.mark.parametrize("args, message", [
    ([], "needs a command"),
    (["--num-processes", "0"], "must be >= 1"),
    (["--coordinator", "nohostport"], "HOST:PORT"),
    (["--", "no-such-command-here"], "not found"),
])
def test_bad_launcher_arguments_are_clear_errors(args, message, capsys):
    from alpa_lite import cli

    base = ["launch", "--num-processes", "2"]
    if args[:1] == ["--num-processes"]:
        base = ["launch"]
    command = [] if args == [] or "--" in args else ["--", PY, "-c", "pass"]
    assert cli.main(base + args + command) == 2
    assert message in capsys.readouterr().err


def test_initialize_without_a_cluster_is_one_process(monkeypatch):
    monkeypatch.setattr(distributed, "_state", {})
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "ALPA_LITE_")) or name == "KUBERNETES_SERVICE_HOST":
            monkeypatch.delenv(name)
    info = distributed.initialize()
    assert (info.num_processes, info.source) == (1, "single process")
    assert distributed.initialize() is info


def test_initialize_after_the_backend_started_is_a_clear_error(monkeypatch):
    import jax

    jax.devices()  # the backend is running
    monkeypatch.setattr(distributed, "_state", {})
    monkeypatch.setenv("ALPA_LITE_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("ALPA_LITE_NUM_PROCESSES", "2")
    monkeypatch.setenv("ALPA_LITE_PROCESS_ID", "0")
    with pytest.raises(InvalidConfigError, match="before any jax computation"):
        distributed.initialize()


def test_malformed_launcher_variables_are_named(monkeypatch):
    monkeypatch.setattr(distributed, "_state", {})
    monkeypatch.setenv("ALPA_LITE_PROCESS_ID", "one")
    with pytest.raises(InvalidConfigError, match="ALPA_LITE_PROCESS_ID='one'"):
        distributed.initialize()


def test_stages_stay_inside_hosts():
    devices = list(range(8))
    assert place_stages([(1, 4), (1, 4)], devices, 4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    # in order, stage 1 would straddle the two hosts: placed largest first instead
    assert place_stages([(1, 2), (1, 4), (1, 2)], devices, 4) == [(4, 5), (0, 1, 2, 3),
                                                                   (6, 7)]
    assert place_stages([(2, 2), (2, 2)], devices, 4) == [(0, 1, 4, 5), (2, 3, 6, 7)]
    assert place_stages([(1, 2), (1, 6)], devices, 8) == [(0, 1), (2, 3, 4, 5, 6, 7)]
