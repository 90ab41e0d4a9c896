"""Test helpers, public so users can check their own parallel steps the same way."""

from __future__ import annotations

import re

import jax
import numpy as np


def assert_trees_close(actual, expected, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same tree structure, and every leaf close; a failure names the leaf's key path.

    Example:
        >>> assert_trees_close({"w": np.ones(2)}, {"w": np.ones(2)})
    """
    actual_leaves, actual_tree = jax.tree_util.tree_flatten_with_path(actual)
    expected_leaves, expected_tree = jax.tree_util.tree_flatten_with_path(expected)
    if actual_tree != expected_tree:
        raise AssertionError(f"Tree structures differ:\n{actual_tree}\n!=\n{expected_tree}")
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol,
                                   err_msg=f"at leaf {jax.tree_util.keystr(path)}")


def assert_matches_serial(step, parallel_step, *args, rtol: float = 1e-5,
                          atol: float = 1e-6) -> None:
    """``parallel_step(*args)`` must equal the serial reference ``jax.jit(step)(*args)``."""
    expected = jax.jit(step)(*args)
    actual = parallel_step(*args)
    assert_trees_close(actual, expected, rtol=rtol, atol=atol)


_COLLECTIVE_RE = re.compile(
    r"=\s*[^=]*?\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\(")


def count_collectives(hlo_text: str, *, min_elements: int = 0) -> dict[str, int]:
    """Counts collectives in compiled HLO text (async pairs counted once).

    Args:
        hlo_text: ``compiled.as_text()``.
        min_elements: ignore collectives whose result has fewer elements (e.g. scalar losses).
    """
    counts: dict[str, int] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_RE.search(line)
        if not match or "-done(" in line:
            continue
        shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", line.split("=", 1)[1].split(match.group(1))[0])
        elements = max((int(np.prod([int(d) for d in s.split(",") if d] or [1])) for s in shapes),
                       default=1)
        if elements < min_elements:
            continue
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts
