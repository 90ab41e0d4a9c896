"""Follows a PipeshardParallel method through the planner and counts climbs up the import floors.

Runs pipeline plans (tiny MLP on 8 CPU devices; uniform and automatic stages) under
`sys.setprofile`
and records, in call order, the alpa_lite module of every function that receives the method
(a local named ``method`` holding it). A module's floor is its depth in the import graph
(modules importing no other alpa_lite module are floor 0). A *stop* is a change of module in
that sequence; a *climb* is a stop onto a higher floor (returning up, or calling up).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/method_climbs.py
"""

import ast
import functools
import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "alpa_lite"


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def floors(graph) -> dict[str, int]:
    @functools.lru_cache(maxsize=None)
    def floor(m, seen=frozenset()):
        deps = [d for d in graph[m] if d not in seen]
        return 1 + max((floor(d, seen | {m}) for d in deps), default=-1)
    return {m: floor(m) for m in graph}


def main():
    import jax
    import optax

    import alpa_lite

    sys.path.insert(0, str(PACKAGE.parent / "tests" / "end_to_end"))
    from tiny_models import make_mlp, mse_step

    state, batch = make_mlp(64, 64, 4, optimizer=optax.sgd(0.1))
    level = floors(import_graph())
    for stage_option in (alpa_lite.UniformStageOption(num_stages=2),
                         alpa_lite.AutoStageOption(submesh_shapes=((1, 4),))):
        method = alpa_lite.PipeshardParallel(
            num_micro_batches=2, layer_option=alpa_lite.AutoLayerOption(layer_num=2),
            stage_option=stage_option, devices=tuple(jax.devices()[:8]))
        follow(method, mse_step, state, batch, level)


def follow(method, step, state, batch, level):
    import alpa_lite

    modules = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_locals.get("method") is method:
            module = frame.f_globals.get("__name__", "")
            if module.startswith("alpa_lite") and (not modules or modules[-1] != module):
                modules.append(module)

    sys.setprofile(profile)
    plan = alpa_lite.parallelize(step, method=method).plan(state, batch)
    sys.setprofile(None)
    start = modules.index("alpa_lite.inter_op.driver")
    path = modules[start:]
    climbs = sum(level[b] > level[a] for a, b in zip(path, path[1:]))
    print(" -> ".join(f"{m.removeprefix('alpa_lite.')}[{level[m]}]" for m in path))
    print(f"{type(method.stage_option).__name__} ({len(plan.stages)} stages): stops "
          f"{len(path)}, climbs back up {climbs}")


if __name__ == "__main__":
    main()
