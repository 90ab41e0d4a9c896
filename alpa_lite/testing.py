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


def xla_footprint_bytes(compiled) -> int:
    """Per-device memory of a compiled program as XLA accounts it: arguments + outputs +
    temporaries - aliased (donated) bytes of ``compiled.memory_analysis()``."""
    stats = compiled.memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes
            + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def assert_matches_serial(step, parallel_step, *args, rtol: float = 1e-5,
                          atol: float = 1e-6) -> None:
    """``parallel_step(*args)`` must equal the serial reference ``jax.jit(step)(*args)``."""
    expected = jax.jit(step)(*args)
    actual = parallel_step(*args)
    assert_trees_close(actual, expected, rtol=rtol, atol=atol)


_COLLECTIVE_RE = re.compile(
    r"=\s*(?P<shape>\(.*?\)|[a-z]+\d*\[[\d,]*\][^ ]*)\s+"
    r"(?P<kind>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_ARRAY_RE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def count_collectives(hlo_text: str, *, min_elements: int = 0,
                      per_tensor: bool = False) -> dict[str, int]:
    """Counts collectives in compiled HLO text (an async start/done pair counts once).

    Args:
        hlo_text: ``compiled.as_text()``.
        min_elements: ignore tensors with fewer elements (e.g. scalar losses).
        per_tensor: count each tensor of a combined (tuple) collective separately; XLA's
            combiner passes merge independent collectives into one op.

    Example:
        >>> count_collectives("  %ar = f32[4,4]{1,0} all-reduce(%x), to_apply=%add")
        {'all-reduce': 1}
    """
    counts: dict[str, int] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_RE.search(line)
        if not match:
            continue
        sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                 for dims in _ARRAY_RE.findall(match.group("shape"))]
        if "-start(" in line and match.group("kind") != "all-reduce":
            sizes = sizes[-1:]  # async start ops return (operand, result)
        kept = [n for n in sizes if n >= min_elements]
        if not kept:
            continue
        kind = match.group("kind")
        counts[kind] = counts.get(kind, 0) + (len(kept) if per_tensor else 1)
    return counts


def split_hlo_computations(hlo_text: str) -> dict[str, str]:
    """Computation name -> its text, for compiled HLO text."""
    computations: dict[str, str] = {}
    name, lines = None, []
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
        if header and not line.startswith(" "):
            if name is not None:
                computations[name] = "\n".join(lines)
            name, lines = header.group(1), []
        elif name is not None:
            lines.append(line)
    if name is not None:
        computations[name] = "\n".join(lines)
    return computations


def count_collectives_in_loops(hlo_text: str, *, min_elements: int = 0) -> dict[str, int]:
    """Collectives inside while-loop bodies (run once per iteration, e.g. per micro-batch)."""
    computations = split_hlo_computations(hlo_text)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
    counts: dict[str, int] = {}
    for body in bodies:
        for kind, n in count_collectives(computations.get(body, ""),
                                         min_elements=min_elements).items():
            counts[kind] = counts.get(kind, 0) + n
    return counts
