"""Roofline compute time: per-dtype peaks, memory bandwidth, measured throughput, plan compute_s."""

import json

import jax
import jax.numpy as jnp
import pytest

from alpa_lite.cluster import ClusterSpec, get_cluster_preset
from alpa_lite.cost import compute_dtype_name, estimate_op_cost
from alpa_lite.errors import InvalidConfigError
from alpa_lite.graph import build_op_graph
from alpa_lite.intra_op.planner import solve_intra_op
from alpa_lite.intra_op.problem import InputRole
from alpa_lite.mesh import LogicalMesh
from alpa_lite.plan import ShardingPlan
from alpa_lite.profiling import LaunchRow, MatmulRow, MemoryBandwidthRow, ProfileDatabase

PEAK = 1e12


def roofline_mesh(shape=(1,), **kw):
    return LogicalMesh(shape=shape, alpha_s=(1e-5,) * len(shape),
                       beta_s_per_byte=(1e-10,) * len(shape), peak_flops_per_s=PEAK, **kw)


def test_roofline_takes_the_larger_of_flop_and_byte_time():
    mesh = roofline_mesh(memory_bandwidth_bytes_per_s=1e11)
    assert mesh.compute_time_s(2e12, 1e9) == pytest.approx(2.0)      # compute bound
    assert mesh.compute_time_s(1e9, 5e11) == pytest.approx(5.0)      # memory bound
    assert mesh.compute_time_s(0.0, 1e11) == pytest.approx(1.0)      # pure data movement


def test_without_bandwidth_only_flops_count():
    mesh = roofline_mesh()
    assert mesh.memory_bandwidth_bytes_per_s is None
    assert mesh.compute_time_s(3e12, 1e15) == pytest.approx(3.0)
    assert mesh.compute_time_s(0.0, 1e15) == 0.0


def test_per_dtype_peak_prices_bf16_twice_as_fast():
    mesh = roofline_mesh(peak_flops_by_dtype={"float32": PEAK, "bfloat16": 2 * PEAK})
    f32 = mesh.compute_time_s(4e12, 0.0, "float32")
    bf16 = mesh.compute_time_s(4e12, 0.0, "bfloat16")
    assert f32 == pytest.approx(4.0) and bf16 == pytest.approx(f32 / 2)
    assert mesh.compute_time_s(4e12, 0.0, "int32") == pytest.approx(4.0)  # falls back


def test_measured_matmul_throughput_replaces_the_peak_for_profiled_dtypes():
    db = ProfileDatabase(matmuls=(
        MatmulRow(dtype="float32", m=100, n=100, k=100, time_s=2e-6),    # 1e12 flop/s
        MatmulRow(dtype="float32", m=1000, n=1000, k=1000, time_s=4e-4)))  # 5e12 flop/s
    mesh = roofline_mesh(profile=db, peak_flops_by_dtype={"bfloat16": 3 * PEAK})
    assert mesh.flops_per_s("float32", 2e9) == pytest.approx(5e12)
    assert mesh.compute_time_s(2e9, 0.0, "float32") == pytest.approx(2e9 / 5e12)
    assert mesh.compute_time_s(2e6, 0.0, "float32") == pytest.approx(2e6 / 1e12)
    assert mesh.flops_per_s("bfloat16", 2e9) == 3 * PEAK  # not profiled: the peak


def test_profile_bandwidth_is_used_when_the_mesh_has_none():
    db = ProfileDatabase(memory_bandwidths=(MemoryBandwidthRow(num_bytes=10**9, time_s=0.01),))
    assert roofline_mesh(profile=db).compute_time_s(0.0, 1e9) == pytest.approx(0.01)
    own = roofline_mesh(profile=db, memory_bandwidth_bytes_per_s=1e9)
    assert own.compute_time_s(0.0, 1e9) == pytest.approx(1.0)


def test_mesh_with_roofline_fields_round_trips_through_json():
    mesh = roofline_mesh(shape=(2, 4), peak_flops_by_dtype={"bfloat16": 2e12, "float32": 1e12},
                         memory_bandwidth_bytes_per_s=2e12, launch_latency_s=1e-5,
                         profile=ProfileDatabase(launches=(LaunchRow(num_devices=1, time_s=1e-5),)))
    loaded = LogicalMesh.from_dict(json.loads(json.dumps(mesh.to_dict())))
    assert loaded == mesh and hash(loaded) == hash(mesh)
    assert loaded.peak_flops_by_dtype == (("bfloat16", 2e12), ("float32", 1e12))
    old = {k: v for k, v in mesh.to_dict().items()
           if k not in ("peak_flops_by_dtype", "memory_bandwidth_bytes_per_s", "launch_latency_s")}
    assert LogicalMesh.from_dict(old).memory_bandwidth_bytes_per_s is None  # old plans load


@pytest.mark.parametrize("kw, match", [
    ({"memory_bandwidth_bytes_per_s": 0.0}, "memory_bandwidth_bytes_per_s must be a positive"),
    ({"launch_latency_s": -1.0}, "launch_latency_s must be a finite number"),
    ({"peak_flops_by_dtype": {"bfloat16": -2.0}}, r"peak_flops_by_dtype\['bfloat16'\]"),
])
def test_mesh_rejects_bad_roofline_numbers(kw, match):
    with pytest.raises(InvalidConfigError, match=match):
        roofline_mesh(**kw)


def test_compute_dtype_is_the_first_floating_operand():
    bf16 = jax.ShapeDtypeStruct((2, 2), jnp.bfloat16)
    f32 = jax.ShapeDtypeStruct((2, 2), jnp.float32)
    i32 = jax.ShapeDtypeStruct((2,), jnp.int32)
    assert compute_dtype_name((bf16, bf16), (f32,)) == "bfloat16"
    assert compute_dtype_name((i32,), (f32,)) == "float32"
    assert compute_dtype_name((i32,), (i32,)) == "int32"
    assert compute_dtype_name((), ()) == "float32"


# ------------------------------------------------------------------ plans


def mlp(w1, w2, x):
    return jnp.tanh(x @ w1) @ w2


def plan_mlp(mesh, dtype=jnp.float32) -> tuple[ShardingPlan, float]:
    args = (jnp.ones((64, 128), dtype), jnp.ones((128, 32), dtype), jnp.ones((16, 64), dtype))
    graph = build_op_graph(jax.make_jaxpr(mlp)(*args))
    plan = solve_intra_op(graph, mesh, input_roles=[InputRole.PARAM] * 2 + [InputRole.BATCH],
                          input_paths=["w1", "w2", "x"])
    total_flops = 0.0
    for node in graph.nodes:
        avals_in = [v.aval if not isinstance(v, int) else graph.avals[v] for v in node.invars]
        total_flops += estimate_op_cost(node.primitive, node.params, avals_in,
                                        [graph.avals[v] for v in node.outvars]).flops
    return plan, total_flops


def test_plan_compute_s_without_bandwidth_is_flops_over_peak_as_before():
    plan, flops = plan_mlp(roofline_mesh())
    assert flops > 2 * 16 * 64 * 128
    assert plan.compute_s == pytest.approx(flops / PEAK)


def test_plan_compute_s_uses_dtype_peaks_and_bandwidth_not_launches():
    base, flops = plan_mlp(roofline_mesh(), jnp.bfloat16)
    fast = plan_mlp(roofline_mesh(peak_flops_by_dtype={"bfloat16": 2 * PEAK}), jnp.bfloat16)[0]
    assert fast.compute_s == pytest.approx(base.compute_s / 2)
    # launches are priced where programs are counted (single_mesh_step_time_s, pricing)
    launched = plan_mlp(roofline_mesh(launch_latency_s=1e-3), jnp.bfloat16)[0]
    assert launched.compute_s == pytest.approx(base.compute_s)
    slow_memory = plan_mlp(roofline_mesh(memory_bandwidth_bytes_per_s=1e6), jnp.bfloat16)[0]
    assert slow_memory.compute_s > 100 * base.compute_s  # every op is memory bound at 1 MB/s


def test_sharded_plan_divides_bytes_by_the_work_divisor():
    mesh = roofline_mesh(shape=(8,), memory_bandwidth_bytes_per_s=1e6)
    sharded, _ = plan_mlp(mesh)
    single, _ = plan_mlp(roofline_mesh(memory_bandwidth_bytes_per_s=1e6))
    assert sharded.compute_s < single.compute_s


# ------------------------------------------------------------------ clusters


def test_presets_carry_datasheet_memory_bandwidth_and_a_launch_latency():
    assert get_cluster_preset("v100-32gb-4x").memory_bandwidth_bytes_per_s == 900e9
    assert get_cluster_preset("h100-80gb-8x").memory_bandwidth_bytes_per_s == 3.35e12
    assert 1.5e12 <= get_cluster_preset("a100-80gb-8x").memory_bandwidth_bytes_per_s <= 2.1e12
    for name in ("cpu-sim", "a100-80gb-8x"):
        assert get_cluster_preset(name).launch_latency_s > 0


def test_cluster_logical_mesh_gets_dtype_peaks_bandwidth_and_latency():
    spec = get_cluster_preset("a100-80gb-8x")
    mesh = spec.logical_mesh((1, 8), (2, 4))
    assert mesh.peak_flops_per_s == 19.5e12
    # the device model: matmuls at peak x efficiency, other operators at the vector rate,
    # memory-bound kernels at the achievable share of the HBM figure
    assert mesh.flops_per_s("bfloat16") == pytest.approx(312e12 * spec.matmul_efficiency)
    assert mesh.flops_per_s("bfloat16", matmul=False) == 19.5e12
    assert mesh.memory_bandwidth_bytes_per_s == pytest.approx(
        spec.memory_bandwidth_bytes_per_s * spec.memory_efficiency)
    assert mesh.op_latency_s == spec.kernel_floor_s > 0
    assert mesh.launch_latency_s == spec.launch_latency_s


def test_with_profile_takes_measured_bandwidth_and_launch_latency_per_mesh_size():
    db = ProfileDatabase(
        launches=(LaunchRow(num_devices=1, time_s=7e-6), LaunchRow(num_devices=8, time_s=1e-4)),
        memory_bandwidths=(MemoryBandwidthRow(num_bytes=2**20, time_s=1e-5),
                           MemoryBandwidthRow(num_bytes=2**27, time_s=1e-2)))
    spec = get_cluster_preset("cpu-sim").with_profile(db)
    assert spec.memory_bandwidth_bytes_per_s == pytest.approx(2**27 / 1e-2)  # largest pass
    assert spec.launch_latency_s == 7e-6
    assert spec.logical_mesh((1, 8), (8,)).launch_latency_s == 1e-4
    assert spec.logical_mesh((1, 4), (4,)).launch_latency_s == pytest.approx(
        7e-6 + 3 * (1e-4 - 7e-6) / 7)  # interpolated between 1 and 8 devices
    loaded = ClusterSpec.from_json(spec.to_json())
    assert loaded == spec


def test_old_cluster_json_without_roofline_keys_still_loads():
    data = json.loads(get_cluster_preset("cpu-sim").to_json())
    del data["memory_bandwidth_bytes_per_s"], data["launch_latency_s"]
    spec = ClusterSpec.from_dict(data)
    assert spec.memory_bandwidth_bytes_per_s is None and spec.launch_latency_s == 0.0
