"""Named layouts, the GPU device model and the step-time breakdown (issue 24)."""

import dataclasses
import json

import pytest

from alpa_lite.cli import main
from alpa_lite.cluster import ClusterSpec, get_cluster_preset
from alpa_lite.errors import InvalidConfigError
from alpa_lite.explain import Breakdown
from alpa_lite.layout import Layout
from alpa_lite.models.presets import custom_preset, get_preset
from alpa_lite.profiling.database import (LaunchRow, MatmulRow, MemoryBandwidthRow,
                                          ProfileDatabase)
from alpa_lite.simulate import simulate

TINY = get_preset("gpt-tiny").with_overrides(num_layers=4, batch_size=16, dtype="bfloat16")
A100x2 = get_cluster_preset("a100-80gb-8x").with_hosts(2)


def _sums_to_total(breakdown: Breakdown) -> None:
    assert sum(s for _, s in breakdown.time) == pytest.approx(breakdown.total_s, rel=1e-9)
    assert all(s >= 0 for _, s in breakdown.time)


@pytest.fixture(scope="module")
def megatron_2x2():
    return simulate(TINY, get_cluster_preset("a100-80gb-8x"),
                    layout=Layout(method="megatron", tp=2, pp=2, micro_batch_size=2))


def test_megatron_layout_is_priced_as_named(megatron_2x2):
    plan = megatron_2x2
    assert plan.extra.grid == (2, 2, 2)  # dp = 8 devices / (tp 2 x pp 2)
    assert plan.num_micro_batches == 16 // (2 * 2)  # batch / (dp x micro-batch size)
    assert [st.layers for st in plan.stages] == [(0, 1), (2, 3)]
    assert all(st.logical_mesh == (2, 2) for st in plan.stages)
    assert plan.extra.layout == {"method": "megatron", "tp": 2, "pp": 2, "dp": 2,
                                 "micro_batch_size": 2, "schedule": "1f1b", "remat": "off"}


@pytest.mark.parametrize("schedule", ["zb-h1", "interleaved-1f1b"])
def test_zero_bubble_and_interleaved_layouts_shrink_the_bubble_they_report(megatron_2x2,
                                                                          schedule):
    plan = simulate(TINY, get_cluster_preset("a100-80gb-8x"), layout=Layout(
        method="megatron", tp=2, pp=2, micro_batch_size=2, schedule=schedule))
    assert (plan.extra.schedule, plan.extra.virtual_stages) == (
        schedule, 2 if schedule == "interleaved-1f1b" else 1)
    _sums_to_total(plan.extra.breakdown)
    bubble = dict(plan.extra.breakdown.time)["pipeline bubble"]
    assert 0 < bubble < dict(megatron_2x2.extra.breakdown.time)["pipeline bubble"]
    if schedule == "interleaved-1f1b":  # stage s holds chunks s and s + 2 of one block each
        assert [st.layers for st in plan.stages] == [(0, 2), (1, 3)]


def test_pipeline_breakdown_sums_to_the_prediction(megatron_2x2):
    breakdown = megatron_2x2.extra.breakdown
    _sums_to_total(breakdown)
    assert breakdown.total_s == megatron_2x2.predicted_step_time_s
    parts = dict(breakdown.time)
    # a GPU cluster's stages run side by side: everything is attributed to a named part
    assert "unattributed (per micro-batch)" not in parts and "stages sharing a host" not in parts
    assert parts["pipeline bubble"] > 0 and parts["compute: matmul"] > 0
    assert parts["activation collectives (tensor parallel)"] > 0  # tp = 2
    memory = dict(breakdown.memory)
    assert memory["optimizer state"] == pytest.approx(2 * memory["parameters"], rel=1e-3)  # AdamW
    assert len(breakdown.stages) == 2
    assert Breakdown.from_dict(json.loads(json.dumps(breakdown.to_dict()))) == breakdown
    assert "pipeline bubble" in breakdown.format()


def test_tensor_parallelism_shards_the_parameters():
    cluster = get_cluster_preset("a100-80gb-8x")
    state = {}
    for tp in (1, 4):
        plan = simulate(TINY, cluster, layout=Layout(method="megatron", tp=tp, pp=1,
                                                     micro_batch_size=2))
        state[tp] = dict(plan.extra.breakdown.memory)["parameters"]
    # every matrix is split over tp (vectors may stay whole): well under half per device
    assert state[4] < 0.5 * state[1]


def test_single_mesh_layout_takes_micro_batch_size_and_remat():
    results = {remat: simulate(TINY, A100x2, layout=Layout(
        method="zero3", micro_batch_size=1, remat=remat)) for remat in ("off", "layer")}
    for remat, plan in results.items():
        assert plan.num_micro_batches == 16 // 16  # batch 16 over 16 devices, 1 each
        assert plan.extra.layout["remat"] == remat
        _sums_to_total(plan.extra.breakdown)
        parts = dict(plan.extra.breakdown.time)
        # the parts the model attributes cover all but a sliver of the single-mesh step
        assert parts.get("unattributed", 0.0) < 0.05 * plan.predicted_step_time_s
    off, layer = results["off"], results["layer"]
    assert "recompute (forward again)" in dict(layer.extra.breakdown.time)
    assert layer.predicted_step_time_s > off.predicted_step_time_s


def test_single_mesh_methods_accumulate_until_they_fit():
    # 2 MiB per device: one micro-batch of 16 sequences does not fit, more of them might
    cluster = get_cluster_preset("a100-80gb-8x").with_memory(3 * 2**20)
    one = simulate(TINY, cluster, method="dp", num_micro_batches=1)
    auto = simulate(TINY, cluster, method="dp")
    assert auto.num_micro_batches >= 1
    assert auto.peak_memory_bytes <= one.peak_memory_bytes
    assert auto.extra.fits_memory or auto.num_micro_batches == 2  # the most there is: 16 / 8


@pytest.mark.parametrize("layout, hosts, match", [
    (dict(method="megatron", tp=3, pp=1), 3, "tp=3 must divide the 4 devices per host"),
    (dict(method="megatron", tp=2, pp=2, dp=4), 2, "uses 16 devices; the cluster has 8"),
    (dict(method="megatron", tp=2, pp=8), 2, "8 devices do not divide into tp=2 x pp=8"),
    (dict(method="megatron", tp=1, pp=8), 2, "pp=8 stages need at least 8 blocks"),
    (dict(method="megatron", tp=2, pp=1, micro_batch_size=3), 2, "does not split"),
    (dict(method="dp", micro_batch_size=5), 2, "multiple of 40"),
])
def test_bad_layouts_are_explained(layout, hosts, match):
    cluster = get_cluster_preset("v100-32gb-4x").with_hosts(hosts)
    with pytest.raises(InvalidConfigError, match=match):
        simulate(TINY, cluster, layout=Layout(**layout))


@pytest.mark.parametrize("fields, match", [
    (dict(method="auto"), "searches; it is not a layout"),
    (dict(method="zero3", tp=2), "Megatron's"),
    (dict(method="megatron", schedule="zb"), "schedule must be one of"),
    (dict(method="megatron", tp=0), "positive integer"),
])
def test_layout_fields_are_checked(fields, match):
    with pytest.raises(InvalidConfigError, match=match):
        Layout(**fields)


def test_cli_layout_flags_file_and_feedback(tmp_path, capsys):
    common = ["plan", "--model", "gpt", "--hidden", "64", "--num-layers", "4", "--heads", "4",
              "--vocab", "128", "--seq-len", "16", "--batch-size", "16", "--cluster", "1x8",
              "--device", "a100-80gb-8x", "--no-progress"]
    first = tmp_path / "first.json"
    assert main(common + ["--method", "megatron", "--tp", "2", "--pp", "2",
                          "--micro-batch-size", "2", "--remat", "off", "--explain",
                          "--json", str(first)]) == 0
    out = capsys.readouterr().out
    assert "pipeline bubble" in out and "predicted step" in out
    data = json.loads(first.read_text())
    assert data["layout"]["tp"] == 2 and data["fits_memory"] is True
    assert data["breakdown"]["total_s"] == data["predicted_step_time_s"]
    # the JSON fed back, and a hand-written layout file, price the same layout the same way
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({"method": "megatron", "tp": 2, "pp": 2,
                                "micro_batch_size": 2, "remat": "off"}))
    for layout_file in (first, hand):
        again = tmp_path / "again.json"
        assert main(common + ["--layout", str(layout_file), "--json", str(again)]) == 0
        assert json.loads(again.read_text())["predicted_step_time_s"] == pytest.approx(
            data["predicted_step_time_s"], rel=1e-9)


def test_cli_layout_errors(tmp_path, capsys):
    common = ["plan", "--model", "gpt-tiny", "--cluster", "1x8", "--no-progress"]
    assert main(common + ["--method", "auto", "--tp", "2"]) == 2
    assert "--method megatron" in capsys.readouterr().err
    searched = tmp_path / "auto.json"
    searched.write_text(json.dumps({"method": "auto", "layout": None}))
    assert main(common + ["--layout", str(searched)]) == 2
    assert "searched plan, not a named layout" in capsys.readouterr().err
    assert main(common + ["--layout", str(tmp_path / "missing.json")]) == 2
    assert main(common + ["--hidden", "64"]) == 2
    assert "--model gpt or --model llama" in capsys.readouterr().err
    assert main(["plan", "--model", "gpt", "--hidden", "64", "--cluster", "1x8"]) == 2
    assert "needs --heads, --num-layers" in capsys.readouterr().err


def test_model_dimension_flags_build_the_model():
    gpt = custom_preset("gpt", hidden=2304, num_layers=24, heads=24, seq_len=2048, batch=512)
    assert (gpt.config.hidden_size, gpt.config.num_layers, gpt.config.vocab_size) == (
        2304, 24, 51200)
    assert gpt.nominal_params == pytest.approx(1.7e9, rel=0.05)  # Megatron's "1.7B"
    llama = custom_preset("llama", hidden=4096, num_layers=32, heads=32, ffn=11008)
    assert llama.nominal_params == pytest.approx(6.7e9, rel=0.03)  # LLaMA-2 7B
    with pytest.raises(InvalidConfigError, match="needs --ffn"):
        custom_preset("llama", hidden=64, num_layers=2, heads=4)
    with pytest.raises(InvalidConfigError, match="must divide --hidden"):
        custom_preset("gpt", hidden=64, num_layers=2, heads=5)


def test_a_profile_database_overrides_the_preset():
    preset = get_cluster_preset("a100-80gb-8x")
    mesh = preset.logical_mesh((1, 8), (8,))
    assert mesh.flops_per_s("bfloat16", 1e12) == pytest.approx(312e12 * 0.72)
    db = ProfileDatabase(
        matmuls=(MatmulRow(dtype="bfloat16", m=4096, n=4096, k=4096, time_s=1e-3),),
        memory_bandwidths=(MemoryBandwidthRow(num_bytes=2**30, time_s=1e-3),),
        launches=(LaunchRow(num_devices=8, time_s=3e-5),
                  LaunchRow(num_devices=8, time_s=9e-6, kind="operator")))
    profiled = preset.with_profile(db)
    mesh = profiled.logical_mesh((1, 8), (8,))
    measured = 2 * 4096**3 / 1e-3
    assert mesh.flops_per_s("bfloat16", 2 * 4096**3) == pytest.approx(measured)
    # measured bandwidth is what kernels reach: no efficiency on top of it
    assert mesh.memory_bandwidth_bytes_per_s == pytest.approx(2**30 / 1e-3)
    assert mesh.op_latency_s == pytest.approx(9e-6)  # replaces the 5 us kernel floor
    assert ClusterSpec.from_json(profiled.to_json()) == profiled
    plans = [simulate(TINY, spec, layout=Layout(method="dp", micro_batch_size=2))
             for spec in (preset, profiled)]
    assert plans[0].predicted_step_time_s != plans[1].predicted_step_time_s


def test_device_model_constants_are_checked():
    with pytest.raises(InvalidConfigError, match="matmul_efficiency must be a fraction"):
        dataclasses.replace(get_cluster_preset("a100-80gb-8x"), matmul_efficiency=1.5)
    with pytest.raises(InvalidConfigError, match="kernel_floor_s"):
        dataclasses.replace(get_cluster_preset("a100-80gb-8x"), kernel_floor_s=-1.0)


def test_megatron_calibration_point_is_within_the_band():
    """The first Megatron-LM A100 point (1.7B, t=1, p=1, d=32): published 3.53 s per step."""
    preset = custom_preset("gpt", hidden=2304, num_layers=24, heads=24, seq_len=2048,
                           batch=512).with_overrides(dtype="bfloat16")
    plan = simulate(preset, get_cluster_preset("a100-80gb-8x").with_hosts(4),
                    layout=Layout(method="megatron", micro_batch_size=1, remat="layer"))
    published = 96 * 512 * 2048 * 24 * 2304**2 * (
        1 + 2048 / (6 * 2304) + 51200 / (16 * 24 * 2304)) / (137e12 * 32)
    assert 0.85 <= plan.predicted_step_time_s / published <= 1.15


def test_cli_compare_explain_sets_the_methods_side_by_side(capsys):
    assert main(["plan", "--model", "gpt-tiny", "--num-layers", "4", "--cluster", "1x8",
                 "--device", "a100-80gb-8x", "--remat", "off", "--compare", "--explain",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("predicted speedup"):] if "predicted speedup" in out else out
    header = next(line for line in table.splitlines() if "zero3" in line and "megatron" in line)
    assert header.split() == ["auto", "megatron", "zero2", "zero3"]
    assert "optimizer update" in table and "predicted step" in table


def test_explain_a_plan_of_parallelize():
    import alpa_lite
    from alpa_lite.models.train import build_workload

    work = build_workload(get_preset("gpt-tiny"), abstract=True)
    methods = {"shard": alpa_lite.ShardParallel(mesh_shape=(2, 4), num_micro_batches=2),
               "pipeline": alpa_lite.PipeshardParallel(
                   num_micro_batches=2, stage_option=alpa_lite.UniformStageOption(num_stages=2),
                   layer_option=alpa_lite.AutoLayerOption(layer_num=2))}
    for name, method in methods.items():
        plan = alpa_lite.parallelize(work.train_step, method=method).plan(work.state, work.batch)
        breakdown = plan.explain()
        _sums_to_total(breakdown)
        assert breakdown.total_s == plan.predicted_step_time_s
        parts = dict(breakdown.time)
        if name == "pipeline":
            assert parts["pipeline bubble"] > 0 and len(breakdown.stages) == 2
        else:
            assert parts["compute: matmul"] > 0 and "gradient sync (exposed)" in parts
        assert "predicted step" in breakdown.format()
