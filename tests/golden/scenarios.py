"""Golden plans: fixed scenarios whose plans a refactoring of the planner must reproduce.

Each scenario returns a JSON-compatible *essence* of its plan: what was decided (stages,
meshes, strategies, specs) and what was predicted (times, memory), without timings of the
search itself. `tests/golden/test_golden_plans.py` compares the essence with the recorded one
(`tests/golden/plans/jax-X.Y/NAME.json`): decisions exactly, predictions to 1e-9 relative.

Record again (only when a change of plans is intended, and say why in the commit):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/golden/scenarios.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys

def plans_dir() -> pathlib.Path:
    """Golden plans per jax minor version: another jax traces other jaxprs (operator indices,
    fused primitives), so each supported version has its own recording."""
    import jax

    major, minor = jax.__version__.split(".")[:2]
    return pathlib.Path(__file__).parent / "plans" / f"jax-{major}.{minor}"


def plan_essence(plan) -> dict:
    """What a `ParallelPlan` decided and predicted (read through its public API)."""
    return {
        "method": plan.method, "num_micro_batches": plan.num_micro_batches,
        "predicted_step_time_s": plan.predicted_step_time_s,
        "peak_memory_bytes": plan.peak_memory_bytes,
        "schedule": getattr(plan.extra, "schedule", None),
        "virtual_stages": getattr(plan.extra, "virtual_stages", None),
        "sharding": None if plan.sharding is None else _sharding_essence(plan.sharding),
        "stages": [{
            "layers": list(s.layers), "submesh": list(s.submesh),
            "logical_mesh": list(s.logical_mesh), "remat": s.remat, "lean": s.lean,
            "forward_s": s.forward_s, "backward_s": s.backward_s,
            "grad_sync_s": s.grad_sync_s, "apply_s": s.apply_s,
            "peak_memory_bytes": s.peak_memory_bytes,
            "plan": None if s.plan is None else _sharding_essence(s.plan)}
            for s in plan.stages],
    }


def _sharding_essence(sharding) -> dict:
    return {
        "mesh": list(sharding.mesh.shape), "objective": sharding.objective,
        "compute_s": sharding.compute_s, "peak_memory_bytes": sharding.peak_memory_bytes,
        "input_specs": [_spec(s) for s in sharding.input_specs],
        "output_specs": [_spec(s) for s in sharding.output_specs],
        "nodes": [[n.index, n.primitive, n.strategy, [_spec(s) for s in n.out_specs]]
                  for n in sharding.nodes],
    }


def _spec(spec):
    return None if spec is None else [list(axes) for axes in spec]


# --- scenarios on 8 simulated CPU devices ----------------------------------------------------


def _mlp(optimizer=None):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(3):
                x = nn.relu(nn.Dense(64)(x))
            return nn.Dense(64)(x)

    model = MLP()
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)}
    params = model.init(jax.random.PRNGKey(0), batch["x"])
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=optimizer or optax.adam(1e-3))
    return state, batch


def _mse_step(value_and_grad):
    """A train step on the MLP's mean squared error, differentiated by ``value_and_grad``
    (`alpa_lite.value_and_grad` or jax's). Kept here, not shared with the other tests'
    models, so that editing those never changes a golden plan."""
    import jax.numpy as jnp

    def step(state, batch):
        def loss_fn(params):
            return jnp.mean((state.apply_fn(params, batch["x"]) - batch["y"]) ** 2)

        loss, grads = value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    return step


def _mlp_step(state, batch):
    import alpa_lite

    return _mse_step(alpa_lite.value_and_grad)(state, batch)


def _jax_grad_step(state, batch):
    import jax

    return _mse_step(jax.value_and_grad)(state, batch)


def _gpt(num_layers=4, batch_size=16, scan_layers=False):
    import optax

    from alpa_lite.models import build_workload, get_preset

    preset = get_preset("gpt-tiny").with_overrides(num_layers=num_layers, batch_size=batch_size)
    if scan_layers:
        preset = dataclasses.replace(preset, config=dataclasses.replace(
            preset.config, scan_layers=True))
    return build_workload(preset, optimizer=optax.sgd(1e-2, momentum=0.9))


def _plan(fun, args, method, **kwargs):
    import alpa_lite

    return alpa_lite.parallelize(fun, method=method, **kwargs).plan(*args)


def _single_mesh(method_name: str, **options):
    def scenario():
        import alpa_lite

        state, batch = _mlp()
        method = getattr(alpa_lite, method_name)(**options)
        return _plan(_mlp_step, (state, batch), method, donate_argnums=(0,))
    return scenario


def _gpt_pipeline(stage_option, remat_layer=False, budget=None, num_devices=8, k=2,
                  layer_num=4, cluster=None, batch_size=16):
    def scenario():
        import jax

        import alpa_lite

        work = _gpt(batch_size=batch_size)
        method = alpa_lite.PipeshardParallel(
            num_micro_batches=k, stage_option=stage_option,
            devices=tuple(jax.devices()[:num_devices]), memory_budget_per_device=budget,
            layer_option=alpa_lite.AutoLayerOption(layer_num=layer_num, method="names",
                                                   remat_layer=remat_layer))
        return _plan(work.train_step, (work.state, work.batch), method, donate_argnums=(0,),
                     cluster=cluster)
    return scenario


def _gpt_remat_auto():
    free = _gpt_pipeline(alpa_lite_auto_stages(((1, 1),)), "auto", None, num_devices=2)()
    budget = 0.85 * max(s.peak_memory_bytes for s in free.stages)
    return _gpt_pipeline(alpa_lite_auto_stages(((1, 1),)), "auto", budget, num_devices=2)()


def _gpt_lean():
    from alpa_lite.cluster import get_cluster_preset

    v100 = get_cluster_preset("v100-32gb-4x")
    free = _gpt_pipeline("auto", num_devices=4, k=8, cluster=v100, batch_size=64)()
    budget = 0.65 * max(s.peak_memory_bytes for s in free.stages)
    return _gpt_pipeline("auto", budget=budget, num_devices=4, k=8, cluster=v100,
                         batch_size=64)()


def alpa_lite_auto_stages(shapes):
    import alpa_lite

    return alpa_lite.AutoStageOption(submesh_shapes=shapes)


def _gpt_uniform():
    import alpa_lite

    return _gpt_pipeline(alpa_lite.UniformStageOption(num_stages=2))()


def _gpt_manual():
    import alpa_lite

    return _gpt_pipeline(alpa_lite.ManualStageOption(
        forward_stage_layer_ids=((0,), (1, 2, 3)), submesh_shapes=((1, 2), (1, 4)),
        logical_mesh_shapes=((2,), (2, 2))), num_devices=6)()


def _gpt_scanned_shard():
    import alpa_lite

    work = _gpt(num_layers=4, batch_size=8, scan_layers=True)
    return _plan(work.train_step, (work.state, work.batch), alpa_lite.ShardParallel())


def _gpt_scanned_pipeline():
    import alpa_lite

    work = _gpt(num_layers=4, batch_size=8, scan_layers=True)
    method = alpa_lite.PipeshardParallel(
        num_micro_batches=2, stage_option=alpa_lite.UniformStageOption(num_stages=2),
        layer_option=alpa_lite.AutoLayerOption(layer_num=2))
    return _plan(work.train_step, (work.state, work.batch), method)


def _jax_grad_pipeline():
    import optax

    import alpa_lite

    state, batch = _mlp(optax.sgd(1e-2, momentum=0.9))
    method = alpa_lite.PipeshardParallel(
        num_micro_batches=4, stage_option=alpa_lite.UniformStageOption(num_stages=2),
        layer_option=alpa_lite.AutoLayerOption(layer_num=2))
    return _plan(_jax_grad_step, (state, batch), method)


def _one_stage_pipeline():
    import jax

    import alpa_lite

    state, batch = _mlp()
    method = alpa_lite.PipeshardParallel(
        num_micro_batches=2, devices=tuple(jax.devices()[:4]),
        stage_option=alpa_lite.AutoStageOption(max_num_stages=1),
        layer_option=alpa_lite.AutoLayerOption(layer_num=2))
    return _plan(_mlp_step, (state, batch), method)


def _simulated_pipeline_plan():
    """`parallelize(...).plan(..., cluster=...)`: a pipeline planned for a cluster."""
    import jax

    import alpa_lite
    from alpa_lite.cluster import get_cluster_preset

    work = _gpt()
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      (work.state, work.batch))
    method = alpa_lite.PipeshardParallel(
        num_micro_batches=4, layer_option=alpa_lite.AutoLayerOption(layer_num=4,
                                                                      method="names"))
    return alpa_lite.parallelize(work.train_step, method=method, donate_argnums=(0,)).plan(
        *abstract, cluster=get_cluster_preset("v100-32gb-4x"))


DEVICE_SCENARIOS = {
    "mlp_shard": _single_mesh("ShardParallel"),
    "mlp_shard_2d": _single_mesh("ShardParallel", mesh_shape=(2, 4)),
    "mlp_shard_micro": _single_mesh("ShardParallel", num_micro_batches=2),
    "mlp_data": _single_mesh("DataParallel"),
    "mlp_zero2": _single_mesh("Zero2Parallel"),
    "mlp_zero3": _single_mesh("Zero3Parallel"),
    "gpt_pipeline_auto": _gpt_pipeline("auto"),
    "gpt_pipeline_uniform": _gpt_uniform,
    "gpt_pipeline_manual": _gpt_manual,
    "gpt_pipeline_remat_auto": _gpt_remat_auto,
    "gpt_pipeline_lean": _gpt_lean,
    "gpt_scanned_shard": _gpt_scanned_shard,
    "gpt_scanned_pipeline": _gpt_scanned_pipeline,
    "jax_grad_pipeline": _jax_grad_pipeline,
    "one_stage_pipeline": _one_stage_pipeline,
    "gpt_pipeline_for_cluster": _simulated_pipeline_plan,
}

# `alpa-lite plan --model M --cluster C --compare`: the CLI's JSON, without search times
SIMULATIONS = {
    "sim_gpt-1.3b_1x4": ("gpt-1.3b", "1x4"),
    "sim_gpt-6.7b_2x8": ("gpt-6.7b", "2x8"),
    "sim_llama2-7b_1x4": ("llama2-7b", "1x4"),
}


def simulation_essence(payload: dict) -> dict:
    """The CLI's plan JSON without the search's own timings."""
    def strip(result):
        return {k: v for k, v in result.items() if k != "search_time_s"}

    return {**strip({k: v for k, v in payload.items() if k != "compare"}),
            "compare": [strip(r) for r in payload.get("compare", [])]}


def run_simulation(name: str, tmp_dir: str) -> dict:
    from alpa_lite.cli import main

    model, cluster = SIMULATIONS[name]
    out = os.path.join(tmp_dir, f"{name}.json")
    # in this process: the suite already keeps the cores busy (the worker processes price
    # the same table, tests/test_search_workers.py)
    assert main(["plan", "--model", model, "--cluster", cluster, "--compare", "--no-progress",
                 "--workers", "1", "--json", out]) == 0
    with open(out) as f:
        return simulation_essence(json.load(f))


def run(name: str, tmp_dir: str) -> dict:
    if name in SIMULATIONS:
        return run_simulation(name, tmp_dir)
    return plan_essence(DEVICE_SCENARIOS[name]())


def record(names, tmp_dir: str) -> None:
    plans = plans_dir()
    plans.mkdir(parents=True, exist_ok=True)
    for name in names:
        essence = run(name, tmp_dir)
        (plans / f"{name}.json").write_text(json.dumps(essence, indent=1, sort_keys=True) + "\n")
        print(f"recorded {name}", file=sys.stderr)


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    wanted = sys.argv[1:] or [*DEVICE_SCENARIOS, *SIMULATIONS]
    with tempfile.TemporaryDirectory() as tmp:
        record(wanted, tmp)
