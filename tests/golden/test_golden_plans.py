"""The planner reproduces its recorded plans (`scenarios.py` says how to record them).

Decisions (stages, meshes, strategies, specs, flags) must be equal; predicted times and
memory equal to 1e-9 relative.
"""

import json
import math

import pytest
from scenarios import DEVICE_SCENARIOS, SIMULATIONS, plans_dir, run

REL = 1e-9


def _differences(got, want, path="") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}: keys {sorted(set(got) ^ set(want))} differ"] if set(got) != set(
            want) else []
        for key in sorted(set(got) & set(want)):
            out += _differences(got[key], want[key], f"{path}.{key}")
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want))
                for d in _differences(g, w, f"{path}[{i}]")]
    if (isinstance(want, float) and isinstance(got, (int, float))
            and not isinstance(got, bool) and not isinstance(want, bool)):
        same = (math.isnan(got) and math.isnan(want)) or math.isclose(
            got, want, rel_tol=REL, abs_tol=1e-300)
        return [] if same else [f"{path}: {got!r} != {want!r}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def _check(name, tmp_path):
    path = plans_dir() / f"{name}.json"
    if not path.exists():
        pytest.skip(f"no golden plan recorded for this jax version ({path.parent.name})")
    want = json.loads(path.read_text())
    got = json.loads(json.dumps(run(name, str(tmp_path))))  # tuples -> lists, as recorded
    differences = _differences(got, want)
    assert not differences, f"{name}: {len(differences)} difference(s):\n" + "\n".join(
        differences[:20])


@pytest.mark.parametrize("name", sorted(DEVICE_SCENARIOS))
def test_device_scenario_reproduces_its_golden_plan(name, tmp_path):
    _check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SIMULATIONS))
def test_simulation_reproduces_its_golden_plan(name, tmp_path):
    _check(name, tmp_path)


def test_the_comparison_can_fail():
    assert _differences({"a": [1.0, "x"]}, {"a": [1.0 + 1e-6, "x"]})
    assert _differences({"a": [1.0, "x"]}, {"a": [1.0, "y"]})
    assert not _differences({"a": [1.0, None]}, {"a": [1.0 + 1e-12, None]})
