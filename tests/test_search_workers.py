"""Layer pricing in worker processes gives the table a single process computes."""

import os

import pytest

from alpa_lite import search_workers, simulate as sim
from alpa_lite.cluster import get_cluster_preset
from alpa_lite.models.presets import get_preset


def _jobs():
    preset = get_preset("gpt-tiny").with_overrides(num_layers=4)
    cluster = get_cluster_preset("v100-32gb-4x").with_hosts(4)
    return sim.pricing_jobs(preset, cluster, sim._micro_batch_counts(preset, cluster, None),
                            False)


def _table(levels=(0.0,), fastest=None, workers=1):
    jobs = _jobs()
    assert len({recipe for recipe, _ in jobs}) > 1  # candidates priced at several counts
    with search_workers.worker_pool(workers):
        return dict(search_workers.price_candidates(jobs, levels, fastest))


@pytest.fixture(scope="module")
def serial():
    fastest = _table()
    return fastest, _table((0.03, 0.3), {c: p[0] for c, p in fastest.items()})


def test_workers_price_what_one_process_prices(serial, monkeypatch):
    monkeypatch.setattr(search_workers, "WORTH_WORKERS_S", 0.0)  # always hand off
    fastest, lean = serial
    assert len(fastest) >= 12  # enough candidates that the workers share them
    assert _table(workers=2) == fastest
    assert _table((0.03, 0.3), {c: p[0] for c, p in fastest.items()}, workers=2) == lean


class _ExitWhenUnpickled(float):
    """A level that ends the worker process that unpickles it."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_broken_workers_fall_back_to_this_process(serial, monkeypatch):
    monkeypatch.setattr(search_workers, "WORTH_WORKERS_S", 0.0)
    with pytest.warns(RuntimeWarning, match="falls back to one process"):
        table = _table((_ExitWhenUnpickled(0.0),), workers=2)
    assert table == serial[0]


_BUSY_POOL = '''
import sys, time
from alpa_lite import search_workers

def work(path):
    open(path, "w").close()
    time.sleep(600)

if __name__ == "__main__":
    with search_workers.worker_pool(2):
        executor = search_workers._POOL.get().get()
        futures = [executor.submit(work, f"{sys.argv[1]}/{i}") for i in range(2)]
        time.sleep(600)
'''


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_end_when_the_search_process_is_killed(tmp_path):
    """A killed `alpa-lite plan` took its pricing workers with it only once they watched
    their parent: before, they waited on the pool's queue for hours."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "busy_pool.py"
    script.write_text(_BUSY_POOL)
    proc = subprocess.Popen(["timeout", "-s", "KILL", "300", sys.executable, str(script),
                             str(tmp_path)], stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / str(i)).exists() for i in range(2)):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.2)
        (python,) = _children(proc.pid)  # timeout's child
        workers = [p for p in _children(python) if _alive(p)]
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
        os.kill(python, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "workers outlived their parent"
    finally:
        for pid in [proc.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        proc.stderr.close()
