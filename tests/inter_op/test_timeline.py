"""Timeline simulation of schedules, and the PNG writer."""

import pytest

from alpa_lite.pipeline_model.schedules import build_schedule
from alpa_lite.timeline import plot_timeline, simulate_timeline


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,micro", [(2, 2), (4, 8), (3, 5)])
def test_uniform_stages_take_fill_plus_drain(kind, stages, micro):
    events = simulate_timeline(build_schedule(kind, stages, micro), [1.0] * stages,
                               [2.0] * stages)
    # With equal stages both schedules finish in (m + n - 1) * (f + b).
    assert max(e.end_s for e in events) == pytest.approx((micro + stages - 1) * 3.0)
    for stage in range(stages):
        mine = sorted((e.start_s, e.end_s) for e in events if e.stage == stage)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(mine, mine[1:]))  # one task at a time


def test_slow_stage_paces_the_pipeline():
    events = simulate_timeline(build_schedule("1f1b", 2, 8), [1.0, 3.0], [1.0, 3.0])
    assert max(e.end_s for e in events) >= 8 * 6.0


def test_plot_writes_png(tmp_path):
    events = simulate_timeline(build_schedule("1f1b", 2, 3), [1, 1], [2, 2], [0.5, 0.5])
    path = plot_timeline(events, str(tmp_path / "t.png"), title="x")
    with open(path, "rb") as f:
        assert f.read(4) == b"\x89PNG"
