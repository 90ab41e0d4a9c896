"""The schedule choice after the stage DP: each of 1F1B, interleaved 1F1B and ZB-H1 wins
where its trade-off pays (priced from layer prices alone, no tracing)."""

import dataclasses
import types

import pytest

from alpa_lite.errors import InvalidConfigError
from alpa_lite.inter_op import pricing
from alpa_lite.inter_op.assignment import StageAssignment
from alpa_lite.inter_op.schedule_choice import (candidates, choose_schedule,
                                                interleaved_layers)
from alpa_lite.pipeline_model.schedules import build_schedule
from alpa_lite.summary import _schedule_text


def _layer(compute_s=1.0, activation_bytes=1.0, boundary_bytes=1.0):
    return pricing.LayerPrice(compute_s=compute_s, comm_s=0.0, grad_sync_s=0.0,
                              state_bytes=10.0, activation_bytes=activation_bytes,
                              boundary_bytes=boundary_bytes)


def _choose(num_stages=4, layers=16, k=8, link=(0.0, 0.0), budget=None, launch=0.0,
            requested="auto", heavy_last_stage=False):
    mesh = types.SimpleNamespace(launch_latency_s=launch)
    per = layers // num_stages
    assignment = StageAssignment(tuple(layer // per for layer in range(layers)),
                                 ((1, 2),) * num_stages, ((2,),) * num_stages)
    layer, heavy = _layer(), dataclasses.replace(_layer(), state_bytes=20.0)

    def price_of(stage, i):  # heavy: the last layers hold twice the state (an LM head)
        return heavy if heavy_last_stage and i >= layers - per else layer

    return choose_schedule(requested, None, assignment, price_of, [mesh] * num_stages, link,
                           k, budget)


def test_interleaving_wins_when_the_bubble_is_large_and_transfers_are_free():
    choice = _choose(k=4)
    assert (choice.schedule, choice.virtual_stages) == ("interleaved-1f1b", 4)
    assert choice.layer_to_stage == (0, 1, 2, 3) * 4  # 16 one-layer chunks round robin
    assert choice.runner_up[2] > choice.price.step_time_s


def test_zero_bubble_wins_when_transfers_make_interleaving_expensive():
    choice = _choose(k=4, link=(0.5, 0.0))  # every chunk boundary costs 2 x 0.5 s
    assert choice.schedule == "zb-h1"
    one_f_one_b = _choose(k=4, link=(0.5, 0.0), requested="1f1b")
    # four stages of 4 s per micro-batch: 1F1B idles 3 x 4 s, ZB-H1 about a third of it
    assert choice.price.step_time_s < one_f_one_b.price.step_time_s - 6.0


def test_1f1b_wins_when_memory_binds():
    # The first stage holds 4 micro-batches under 1F1B and ZB-H1, 4 + 3/2 under interleaving;
    # the last holds 1 under 1F1B, 4 under ZB-H1. With the most state on the last stage, a
    # budget that fits 1F1B exactly rules out both.
    plain = _choose(k=8, requested="1f1b", heavy_last_stage=True)
    budget = max(st.memory_bytes for st in plain.price.stages)
    assert budget == plain.price.stages[-1].memory_bytes == 4 * 20 + 1 * 4
    zb = _choose(k=8, requested="zb-h1", heavy_last_stage=True)
    assert zb.price.stages[-1].memory_bytes == 4 * 20 + 4 * 4
    # (transfers priced, so interleaving, which would spread the heavy layers, is slower)
    choice = _choose(k=8, budget=budget, heavy_last_stage=True, link=(0.5, 0.0))
    assert choice.schedule == "1f1b" and choice.fits
    assert choice.runner_up[0] == "interleaved-1f1b"
    assert choice.runner_up[3] and choice.runner_up[2] >= choice.price.step_time_s
    unbounded = _choose(k=8, heavy_last_stage=True, link=(0.5, 0.0))
    assert unbounded.schedule == "zb-h1"  # what the budget ruled out


def test_a_runner_up_over_the_budget_says_so():
    def text(runner_up):
        return _schedule_text(types.SimpleNamespace(schedule="1f1b", virtual_stages=1,
                                                    runner_up=runner_up))

    assert text(("zb-h1", 1, 79.6, False)) == (
        "1f1b (runner-up zb-h1: 79.6s, over the memory budget)")
    assert text(("interleaved-1f1b", 2, 90.0, True)) == "1f1b (runner-up interleaved-1f1b x2: 90s)"
    assert text(("zb-h1", 1, 79.6)) == "1f1b (runner-up zb-h1: 79.6s)"  # plans saved before


def test_1f1b_wins_when_launches_dominate_and_the_bubble_is_small():
    choice = _choose(k=64, launch=0.5)  # ZB-H1 launches 3 programs, interleaving 2 per chunk
    assert choice.schedule == "1f1b"


def test_auto_offers_interleaving_only_where_it_can_run():
    uniform = StageAssignment((0, 0, 1, 1), ((1, 2),) * 2, ((2,),) * 2)
    assert ("interleaved-1f1b", 2) in candidates("auto", None, uniform, 4)
    assert ("interleaved-1f1b", 2) not in candidates("auto", None, uniform, 3)  # 3 % 2
    mixed = StageAssignment((0, 0, 1, 1), ((1, 2), (1, 6)), ((2,), (6,)))
    assert [c for c, _ in candidates("auto", None, mixed, 4)] == ["1f1b", "zb-h1"]
    assert candidates("auto", None, StageAssignment((0, 0), ((1, 8),), ((8,),)), 4) == [
        ("1f1b", 1)]
    with pytest.raises(InvalidConfigError, match="same submesh"):
        candidates("interleaved-1f1b", None, mixed, 4)


def test_interleaved_layers_balance_cost_not_count():
    assert interleaved_layers([1.0] * 8, 2, 2) == (0, 0, 1, 1, 0, 0, 1, 1)
    # a heavy first layer (embedding) gets a chunk of its own
    assert interleaved_layers([3.0, 1, 1, 1, 1, 1, 1], 2, 2) == (0, 1, 1, 0, 0, 1, 1)


def test_priced_step_times_follow_the_timeline():
    """The pricing of ZB-H1 and interleaving is the timeline of the schedule the runtime
    runs; for 1F1B it is the closed form, which the timeline reproduces on equal stages."""
    from alpa_lite.timeline import simulate_timeline

    times = [3.0] * 4
    closed = pricing.pipeline_step_time_s(times, [0.0] * 4, 8)
    schedule = build_schedule("1f1b", 4, 8)
    forward, backward, _ = pricing.task_durations(times, schedule)
    assert closed == max(e.end_s for e in simulate_timeline(schedule, forward, backward))
    zb = pricing.pipeline_step_time_s(times, [0.0] * 4, 8, schedule="zb-h1")
    interleaved = pricing.pipeline_step_time_s(times, [0.0] * 4, 8,
                                               schedule="interleaved-1f1b", virtual_stages=2)
    assert 8 * 3 < zb < closed and interleaved == pytest.approx(8 * 3 + 9 / 2)

