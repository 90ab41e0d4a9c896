"""``alpa-lite launch``: N local processes of one command, as one jax.distributed job.

Like ``torchrun --standalone``: each process gets the coordinator address, the job size and
its index in the environment (read by `alpa_lite.distributed.initialize`), optionally K CPU
devices, and its output lines prefixed with ``[i]``. Ctrl-C (or SIGTERM to the launcher) is
forwarded to every process. When a process exits non-zero, the others are given a grace period
to end on their own, then ended (SIGTERM, then SIGKILL after another grace period: jax catches
SIGTERM and may not exit) and the launcher exits
with the failed process's status (128 + signal for a killed one). Every process runs in its
own session, so it and its children are ended by process group, never by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from alpa_lite.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from alpa_lite.errors import InvalidConfigError

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def with_device_count(xla_flags: str, count: int) -> str:
    """``XLA_FLAGS`` with the simulated CPU device count set to ``count``."""
    kept = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", xla_flags).split()
    return " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={count}"])


def process_environment(base: dict, *, process_id: int, num_processes: int, coordinator: str,
                        devices_per_process: int | None) -> dict:
    env = dict(base)
    env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes),
                ENV_PROCESS_ID: str(process_id), "PYTHONUNBUFFERED": "1"})
    if devices_per_process is not None:
        env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), devices_per_process)
        env["JAX_PLATFORMS"] = "cpu"
        env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    return env


class Launcher:
    """Runs and watches the processes (see the module docstring)."""

    def __init__(self, command: Sequence[str], num_processes: int, *,
                 devices_per_process: int | None = None, coordinator: str | None = None,
                 grace_period_s: float = 10.0, out=None):
        if not command:
            raise InvalidConfigError(
                "alpa-lite launch needs a command after '--', e.g. "
                "alpa-lite launch --num-processes 2 -- python train.py")
        if shutil.which(command[0]) is None:
            raise InvalidConfigError(
                f"alpa-lite launch: command {command[0]!r} not found (not an executable path "
                "and not on PATH). Give the full path, e.g. -- $(which python) train.py.")
        if num_processes < 1:
            raise InvalidConfigError(f"--num-processes must be >= 1; got {num_processes}.")
        if devices_per_process is not None and devices_per_process < 1:
            raise InvalidConfigError(
                f"--devices-per-process must be >= 1; got {devices_per_process}.")
        if coordinator is not None and not re.fullmatch(r"[^:\s]+:\d+", coordinator):
            raise InvalidConfigError(
                f"--coordinator must be HOST:PORT, e.g. 127.0.0.1:1234; got {coordinator!r}.")
        self.command, self.num_processes = list(command), num_processes
        self.devices_per_process, self.grace_period_s = devices_per_process, grace_period_s
        self.coordinator = coordinator or f"127.0.0.1:{free_port()}"
        self.out = out or sys.stdout
        self.processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def run(self) -> int:
        """Starts the processes and returns the job's exit status."""
        previous = {sig: signal.signal(sig, self._forward)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for i in range(self.num_processes):
                env = process_environment(
                    os.environ, process_id=i, num_processes=self.num_processes,
                    coordinator=self.coordinator, devices_per_process=self.devices_per_process)
                self.processes.append(subprocess.Popen(
                    _dying_with_parent(self.command), env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, start_new_session=True))
            for i, process in enumerate(self.processes):
                thread = threading.Thread(target=self._pump, args=(i, process), daemon=True)
                thread.start()
                self._threads.append(thread)
            return self._watch()
        finally:
            self._end_all()
            for thread in self._threads:
                thread.join(timeout=5)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _pump(self, index: int, process: subprocess.Popen) -> None:
        with process.stdout:
            for raw in iter(process.stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                with self._lock:
                    print(f"[{index}] {line}", file=self.out, flush=True)

    def _watch(self) -> int:
        while True:
            codes = [p.poll() for p in self.processes]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = failed[0]
                self._say(f"process {index} exited with status {_describe(code)}; ending the "
                          "others")
                return _exit_status(code)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)

    def _forward(self, signum, frame) -> None:
        self._say(f"got {signal.Signals(signum).name}; forwarding it to every process")
        for process in self.processes:
            _signal_group(process, signum)

    def _end_all(self) -> None:
        """Gives the living processes the grace period to end on their own (a peer failing
        too, e.g. on the same plan mismatch, still prints its error), then SIGTERMs them,
        then SIGKILLs those still alive after another grace period."""
        self._wait_for(self.processes)
        alive = [p for p in self.processes if p.poll() is None]
        for process in alive:
            _signal_group(process, signal.SIGTERM)
        self._wait_for(alive)
        for process in alive:  # the whole group: children the command started die with it
            _signal_group(process, signal.SIGKILL)
            process.wait()

    def _wait_for(self, processes) -> None:
        deadline = time.monotonic() + self.grace_period_s
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                pass

    def _say(self, text: str) -> None:
        with self._lock:
            print(f"[launch] {text}", file=self.out, flush=True)


_EXEC_DYING_WITH_PARENT = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(137)  # the launcher died before prctl\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def _dying_with_parent(command: list[str]) -> list[str]:
    """On Linux, ``command`` started through a small exec wrapper that asks the kernel to
    SIGKILL it when the launcher dies (even by SIGKILL), so no process outlives the job.
    (A ``preexec_fn`` would do the same but forces a fork of the multithreaded launcher.)"""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid())] + command


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # its own session: the group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _describe(code: int) -> str:
    if code < 0:
        return f"{128 - code} (killed by {signal.Signals(-code).name})"
    return str(code)
