"""Simulation: planning for clusters that are not here, from abstract shapes only."""

import dataclasses
import gc
import json

import jax
import pytest

from alpa_lite.cli import main
from alpa_lite.errors import InvalidConfigError
from alpa_lite.cluster import get_cluster_preset
from alpa_lite.models.presets import get_preset
from alpa_lite import simulate as sim
from alpa_lite.simulate import simulate


def test_plans_200_devices_without_allocating():
    gc.collect()  # arrays earlier tests left for the collector
    before = len(jax.live_arrays())
    cluster = get_cluster_preset("v100-32gb-4x").with_hosts(50)
    result = simulate(get_preset("gpt-tiny").with_overrides(num_layers=4), cluster,
                      method="shard")
    assert len(jax.live_arrays()) == before  # nothing was allocated on any device
    assert result.extra.logical_mesh in ((200,), (50, 4))
    assert result.predicted_step_time_s > 0 and result.plan_time_s > 0


def test_pipeline_plan_uses_every_device_once():
    cluster = get_cluster_preset("v100-32gb-4x").with_hosts(2)
    result = simulate(get_preset("gpt-tiny").with_overrides(num_layers=4), cluster)
    assert sum(s.submesh[0] * s.submesh[1] for s in result.stages) == 8
    covered = [b for s in result.stages for b in s.layers]
    assert covered == list(range(4))


@pytest.mark.parametrize("method", ["zero3", "megatron"])
def test_single_mesh_and_grid_methods(method):
    cluster = get_cluster_preset("a100-80gb-8x")
    result = simulate(get_preset("gpt-tiny").with_overrides(num_layers=4), cluster, method=method)
    assert result.predicted_step_time_s > 0
    assert result.peak_memory_bytes > 0


def test_extrapolation_is_linear_in_blocks():
    cluster = get_cluster_preset("a100-80gb-8x")
    times = [simulate(get_preset("gpt-tiny").with_overrides(num_layers=n), cluster,
                      method="shard").predicted_step_time_s for n in (4, 6, 8)]
    assert times[2] - times[1] == pytest.approx(times[1] - times[0], rel=1e-6)


def test_cli_plan_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", "--model", "gpt-tiny", "--num-layers", "4", "--cluster", "2x4",
                 "--memory-per-device", "16GiB", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    for key in ("predicted_step_time_s", "search_time_s", "memory_per_device_bytes", "stages"):
        assert key in data
    assert data["cluster"]["memory_per_device_bytes"] == 16 * 2**30
    assert "predicted step time" in capsys.readouterr().out


def test_cli_plan_rejects_bad_cluster_string(capsys):
    assert main(["plan", "--model", "gpt-tiny", "--cluster", "0x4"]) == 2
    assert "error" in capsys.readouterr().err


def test_python_api_plans_for_a_cluster_without_devices():
    import alpa_lite
    from alpa_lite.models.train import build_workload

    work = build_workload(get_preset("gpt-tiny"), abstract=True)
    cluster = get_cluster_preset("a100-80gb-8x").with_hosts(4)  # 32 devices, we have 8
    p = alpa_lite.parallelize(work.train_step, method=alpa_lite.ShardParallel(mesh_shape=(4, 8)))
    plan = p.plan(work.state, work.batch, cluster=cluster)
    assert plan.sharding.mesh.shape == (4, 8)
    assert plan.sharding.mesh.beta_s_per_byte[0] > plan.sharding.mesh.beta_s_per_byte[1]
    pipe = alpa_lite.parallelize(work.train_step, method=alpa_lite.PipeshardParallel(
        num_micro_batches=2, layer_option=alpa_lite.AutoLayerOption(layer_num=2),
        stage_option="uniform"))
    stages = pipe.plan(work.state, work.batch, cluster=cluster).stages
    assert sum(s.submesh[0] * s.submesh[1] for s in stages) == 32


def _tiny(dtype=None):
    return get_preset("gpt-tiny").with_overrides(num_layers=4, dtype=dtype)


@pytest.fixture(scope="module")
def remat_results():
    cluster = get_cluster_preset("v100-32gb-4x").with_hosts(2)
    return cluster, {mode: simulate(_tiny(), cluster, num_micro_batches=4, remat=mode)
                     for mode in ("off", "layer", "auto")}


def test_remat_layer_saves_activation_memory(remat_results):
    # (its recompute time is priced per layer: tests/end_to_end/test_remat_layers.py; the
    # stage DP may then pick another layout, so step times of tiny models are not ordered)
    _, results = remat_results
    off, layer, auto = results["off"], results["layer"], results["auto"]
    assert layer.peak_memory_bytes < off.peak_memory_bytes
    assert all(s.remat for s in layer.stages) and not any(s.remat for s in off.stages)
    # the DP's choice is never slower than either fixed mode
    assert auto.predicted_step_time_s <= min(off.predicted_step_time_s,
                                             layer.predicted_step_time_s) * (1 + 1e-9)
    assert auto.extra.remat == "auto"


def test_megatron_grid_takes_the_remat_mode(remat_results):
    cluster, results = remat_results
    grid = simulate(_tiny(), cluster, method="megatron", num_micro_batches=4, remat="layer")
    plain = simulate(_tiny(), cluster, method="megatron", num_micro_batches=4)
    assert grid.extra.remat_layers is True and plain.extra.remat_layers is False
    assert grid.peak_memory_bytes < plain.peak_memory_bytes


def test_half_precision_compute_is_priced_at_the_dtype_peak():
    cluster = get_cluster_preset("v100-32gb-4x")
    fp32 = simulate(_tiny(), cluster, num_micro_batches=4)
    fp16 = simulate(_tiny("float16"), cluster, num_micro_batches=4)
    assert fp16.extra.dtype == "float16" and fp32.extra.dtype == "float32"
    assert fp16.peak_memory_bytes < fp32.peak_memory_bytes  # half activations

    # wide enough that the matmuls, not the kernels' fixed costs, set the step (in float16
    # the tiny model runs more kernels: the casts)
    def wide(preset):
        return dataclasses.replace(preset, config=dataclasses.replace(
            preset.config, hidden_size=1024, num_heads=8))

    fp32, fp16 = (simulate(wide(_tiny(dtype)), cluster, num_micro_batches=4)
                  for dtype in (None, "float16"))
    assert fp16.predicted_step_time_s < fp32.predicted_step_time_s  # V100: 125 vs 15.7 TFLOP/s


def test_cli_plan_dtype_and_remat_in_json(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "gpt-tiny", "--num-layers", "4", "--cluster", "1x4",
                 "--dtype", "bfloat16", "--remat", "layer", "--micro-batches", "4",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["dtype"], data["remat"]) == ("bfloat16", "layer")
    assert data["details"]["dtype"] == "bfloat16"
    assert all(s["remat"] for s in data["stages"])


def test_bad_dtype_is_explained():
    with pytest.raises(InvalidConfigError, match="dtype must be one of"):
        get_preset("gpt-tiny").with_overrides(dtype="int8")
    with pytest.raises(InvalidConfigError, match="remat must be one of"):
        simulate(_tiny(), get_cluster_preset("v100-32gb-4x"), remat="sometimes")


def test_cli_plan_defaults_to_the_devices_half_type_and_remat_auto(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "gpt-tiny", "--num-layers", "4", "--cluster", "1x4",
                 "--device", "v100-32gb-4x", "--micro-batches", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["dtype"], data["remat"]) == ("float16", "auto")  # V100: fp16 tensor cores
    assert data["details"]["dtype"] == "float16"


def test_training_dtype_follows_the_peaks():
    assert get_cluster_preset("a100-80gb-8x").training_dtype == "bfloat16"
    assert get_cluster_preset("v100-16gb-4x").training_dtype == "float16"
    assert get_cluster_preset("cpu-sim").training_dtype == "float32"  # bf16 is slower there


def test_memory_lean_layer_plans_are_offered_when_nothing_else_fits():
    """With many micro-batches the fastest layer plans replicate parameters (their gradient
    sync is once per step); when no pipeline of those fits, the DP is offered plans that
    shard them, and fits."""
    preset = get_preset("gpt-tiny").with_overrides(num_layers=4, batch_size=64)
    cluster = get_cluster_preset("v100-32gb-4x")
    free = simulate(preset, cluster, num_micro_batches=8, schedule="1f1b")  # the DP's own
    assert free.extra.lean_offered is False  # fits: lean plans never priced
    budget = 0.7 * free.peak_memory_bytes
    tight = simulate(preset, cluster.with_memory(budget), num_micro_batches=8, schedule="1f1b")
    assert tight.extra.lean_offered is True  # the fastest plans alone did not fit
    assert tight.extra.fits_memory and tight.peak_memory_bytes <= budget
    assert any(s.lean for s in tight.stages)


def test_a_simulated_plan_is_a_plan_record_and_round_trips_through_json():
    from alpa_lite.plan import ParallelPlan, SimulationInfo

    cluster = get_cluster_preset("v100-32gb-4x").with_hosts(2)
    plan = simulate(get_preset("gpt-tiny").with_overrides(num_layers=4), cluster,
                    num_micro_batches=4)
    assert plan.method == "PipeshardParallel" and isinstance(plan.extra, SimulationInfo)
    assert plan.extra.method == "auto" and all(s.plan is None for s in plan.stages)
    assert plan.peak_memory_bytes == max(s.peak_memory_bytes for s in plan.stages)
    again = ParallelPlan.from_json(plan.to_json())
    assert again.extra == plan.extra and again.stages == plan.stages


@pytest.mark.parametrize("remat", ["off", "auto"])
def test_every_stage_splits_its_micro_batches_over_its_first_axis(remat):
    """A candidate is priced at a micro-batch its view's first axis divides and offered only
    at counts whose micro-batches that axis divides (`MicroBatchCounts`): no chosen stage
    splits a micro-batch over more replicas than it has sequences."""
    preset = get_preset("gpt-tiny").with_overrides(num_layers=4, batch_size=32)
    for hosts in (1, 2):
        plan = simulate(preset, get_cluster_preset("v100-32gb-4x").with_hosts(hosts),
                        remat=remat)
        size = 32 // plan.num_micro_batches
        for stage in plan.stages:
            first = stage.logical_mesh[0]
            assert size % first == 0, (plan.num_micro_batches, stage.logical_mesh)


def test_micro_batch_counts_are_the_batch_divisors_a_quarter_apart():
    counts = sim._micro_batch_counts(get_preset("gpt-tiny").with_overrides(batch_size=2304),
                                     get_cluster_preset("a100-80gb-8x").with_hosts(192), None)
    assert counts.default == 2304 and 96 in counts.options  # Megatron's 145.6B count
    assert all(2304 % k == 0 for k in counts.options)


@pytest.mark.parametrize("batch, hosts", [(2304, 192), (2160, 240), (1024, 1)])
def test_micro_batch_counts_hold_one_sequence_per_replica_of_each_host_count(batch, hosts):
    """The thinned divisors (each at least `COUNT_STEP` times the one before) and, for every
    candidate submesh of n hosts, batch / n: 310.1B's 2,160 on 240 hosts keeps Megatron's
    count of 144 (one sequence per replica of a (15, 8) stage), which the thinning drops."""
    cluster = get_cluster_preset("a100-80gb-8x").with_hosts(hosts)
    counts = sim._micro_batch_counts(get_preset("gpt-tiny").with_overrides(batch_size=batch),
                                     cluster, None)
    largest = max(counts.default, 256)
    per_replica = {batch // n for n, _ in sim.candidate_submeshes(cluster)
                   if batch % n == 0 and batch // n <= largest}
    assert per_replica <= set(counts.options)
    assert all(batch % k == 0 and k <= largest for k in counts.options)
    thinned = [k for k in counts.options if k not in per_replica | {counts.default}]
    assert all(b >= sim.COUNT_STEP * a for a, b in zip(thinned, thinned[1:]))
    if batch == 2160:
        assert 144 in counts.options and counts.of(((15, 8), (15, 8))) == 144
        assert counts.offers(((15, 8), (15, 8)), 144)
