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
