"""The shape of the code base: the import floors hold and functions stay short.

Floors (an import may only go down or sideways within a floor's package):

    api, methods, cli, simulate          front doors
    inter_op/  (pipeline planner)        plans pipelines; may use intra_op
    intra_op/  (single-mesh planner)     the ILP and its driver
    emit/                                runs plans; never plans
    pipeline_model/                      the pipeline both planning and running share

`emit` never imports `inter_op`, `intra_op.driver`, `methods` or `simulate`; `inter_op`,
`intra_op` and `pipeline_model` never import `emit`; simulation never reaches `emit`.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "alpa_lite"
MAX_FUNCTION_LINES = 80


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every alpa_lite module -> the alpa_lite modules it imports (anywhere in the file)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[_module_name(path)] = {m for m in found if m.startswith("alpa_lite")}
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def _reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "alpa_lite"


@pytest.mark.parametrize("lower, upper", [
    ("alpa_lite.emit", "alpa_lite.inter_op"), ("alpa_lite.emit", "alpa_lite.intra_op.driver"),
    ("alpa_lite.emit", "alpa_lite.methods"), ("alpa_lite.emit", "alpa_lite.simulate"),
    ("alpa_lite.inter_op", "alpa_lite.emit"), ("alpa_lite.intra_op", "alpa_lite.emit"),
    ("alpa_lite.intra_op", "alpa_lite.inter_op"),
    ("alpa_lite.pipeline_model", "alpa_lite.emit"),
    ("alpa_lite.pipeline_model", "alpa_lite.inter_op"),
    ("alpa_lite.pipeline_model", "alpa_lite.intra_op"),
])
def test_no_import_climbs_a_floor(lower, upper):
    graph = _imports()
    climbs = sorted(f"{m} -> {d}" for m, deps in graph.items() if m.startswith(lower)
                    for d in deps if d.startswith(upper))
    assert not climbs, climbs


def test_no_import_cycle_between_subpackages():
    graph = _imports()
    edges = {(_package(m), _package(d)) for m, deps in graph.items() for d in deps
             if _package(m) != _package(d) and _package(m) != "alpa_lite"
             and _package(d) != "alpa_lite"}
    cycles = sorted((a, b) for a, b in edges if (b, a) in edges)
    assert not cycles, cycles


def test_simulation_and_planners_never_import_emit():
    graph = _imports()
    for start in ("alpa_lite.simulate", "alpa_lite.inter_op.driver", "alpa_lite.intra_op.driver"):
        reached = _reachable(graph, start)
        assert not any(m.startswith("alpa_lite.emit") for m in reached), (start, sorted(reached))


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} "
                                f"({lines} lines)")
    assert not long, long


def test_the_checks_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert _reachable(graph, "a") == {"b", "c"}
    assert _package("alpa_lite.emit.pipeline") == "emit"
    assert _package("alpa_lite.api") == "alpa_lite"
