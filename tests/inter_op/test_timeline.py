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


def test_plan_timeline_draws_weight_gradients_and_chunks():
    import types

    from alpa_lite.timeline import plan_timeline

    stages = [types.SimpleNamespace(forward_s=1.0, backward_s=2.0, remat=False)] * 4
    plan = types.SimpleNamespace(stages=stages)
    one_f_one_b = plan_timeline(plan, build_schedule("1f1b", 4, 8))
    zb = plan_timeline(plan, build_schedule("zb-h1", 4, 8))
    interleaved = plan_timeline(plan, build_schedule("interleaved-1f1b", 4, 8, 2))
    assert {e.kind for e in zb} == {"forward", "backward", "weight", "apply"}
    assert sum(e.kind == "weight" for e in zb) == 4 * 8
    assert sum(e.kind == "forward" for e in interleaved) == 4 * 8 * 2
    end = {name: max(e.end_s for e in events) for name, events in
           [("1f1b", one_f_one_b), ("zb", zb), ("interleaved", interleaved)]}
    assert end["zb"] < end["1f1b"] and end["interleaved"] < end["1f1b"]
