"""Layer clustering: cut a sequence of equations into L layers (numbers only, no jax).

Input: per-equation flops, the bytes crossing a cut after each equation, and L. Output: the
start index of each layer. Alpa (OSDI'22, section 5.2) clusters operators into layers of
roughly equal flops while keeping the data crossing layer boundaries small, since that data is
what a pipeline moves between stages. We solve exactly, with a DP over cut positions:

    minimise   max_l cut_bytes[b_l]          (the largest boundary),
    then       max_l flops(layer l)          (balance, first tie-break),
    then       sum_l cut_bytes[b_l]          (second tie-break),
    subject to flops(layer l) <= (1 + eps) * total_flops / L  and every layer non-empty.

`eps` is relaxed (doubled) until a feasible clustering exists. For long sequences (more than
`EXACT_LIMIT` equations) only cuts at local minima of the crossing bytes are considered, which
keeps the DP fast; layer boundaries of real models are such minima.
"""

from __future__ import annotations

import numpy as np

from alpa_lite.errors import InvalidConfigError

EXACT_LIMIT = 400


def cluster_layers(flops, cut_bytes, num_layers: int, *, eps: float = 0.5) -> list[int]:
    """Start index of each of ``num_layers`` contiguous layers.

    Args:
        flops: flops of each equation (length n).
        cut_bytes: ``cut_bytes[i]`` = bytes crossing a cut placed after equation ``i``
            (length n - 1).
        num_layers: L, at most n.
        eps: allowed flops imbalance per layer.

    Example:
        >>> cluster_layers([1, 1, 1, 1], [5, 1, 5], 2)
        [0, 2]
    """
    flops = np.asarray(flops, dtype=float)
    cut = np.asarray(cut_bytes, dtype=float)
    n = len(flops)
    if not 1 <= num_layers <= n:
        raise InvalidConfigError(
            f"Cannot cut {n} equations into {num_layers} layers; use layer_num between 1 and {n}.")
    if num_layers == 1:
        return [0]
    positions = _candidate_starts(cut, n, num_layers)  # allowed layer starts, 0 first
    prefix_all = np.concatenate([[0.0], np.cumsum(flops)])
    prefix = prefix_all[np.append(positions, n)]
    cut_at = np.array([cut[p - 1] for p in positions[1:]] + [0.0])  # cut before candidate m+1
    total = prefix[-1]
    m = len(positions)
    while True:
        limit = (1 + eps) * total / num_layers + 1e-9 * max(total, 1.0)
        starts = _solve(prefix, np.concatenate([[0.0], cut_at]), m, num_layers, limit)
        if starts is not None:
            return [int(positions[i]) for i in starts]
        eps *= 2


def _candidate_starts(cut, n, num_layers) -> np.ndarray:
    """Equation indices where a layer may start (0 always)."""
    if n <= EXACT_LIMIT:
        return np.arange(n)
    padded = np.concatenate([[np.inf, np.inf], cut, [np.inf, np.inf]])
    window = np.stack([padded[k:k + len(cut)] for k in range(5)])
    minima = np.flatnonzero(cut <= window.min(axis=0)) + 1
    if len(minima) < 4 * num_layers:
        return np.arange(n)
    return np.concatenate([[0], minima])


def _solve(prefix, cut, m, num_layers, limit):
    """Three exact DPs, one per objective, each constrained by the optima before it."""
    max_cut = _dp(prefix, cut, m, num_layers, limit, np.inf, "max_cut")
    if max_cut is None:
        return None
    cut_cap = max_cut[0] * (1 + 1e-12) + 1e-12
    max_flops = _dp(prefix, cut, m, num_layers, limit, cut_cap, "max_flops")
    flops_cap = max_flops[0] * (1 + 1e-12) + 1e-12
    return _dp(prefix, cut, m, num_layers, min(limit, flops_cap), cut_cap, "sum_cut")[1]


def _dp(prefix, cut, m, num_layers, flops_limit, cut_limit, objective):
    """min over splits of ``objective`` into exactly ``num_layers`` layers; (value, starts).

    ``cut[j]`` is the cost of a layer starting at candidate ``j`` (``cut[0]`` is unused), a
    layer's flops must stay within ``flops_limit`` and every cut within ``cut_limit``.
    """
    combine = np.add if objective == "sum_cut" else np.maximum
    best = np.full((num_layers + 1, m + 1), np.inf)
    parent = np.full((num_layers + 1, m + 1), -1, dtype=np.int64)
    first = prefix[1:] <= flops_limit
    best[1, 1:][first] = prefix[1:][first] if objective == "max_flops" else 0.0
    for k in range(2, num_layers + 1):
        for i in range(k, m + 1):
            lo = max(int(np.searchsorted(prefix, prefix[i] - flops_limit, side="left")), k - 1)
            if lo >= i:
                continue
            js = np.arange(lo, i)
            js = js[np.isfinite(best[k - 1, js]) & (cut[js] <= cut_limit)]
            if not len(js):
                continue
            step = prefix[i] - prefix[js] if objective == "max_flops" else cut[js]
            values = combine(best[k - 1, js], step)
            pick = int(np.argmin(values))
            best[k, i], parent[k, i] = values[pick], js[pick]
    if not np.isfinite(best[num_layers, m]):
        return None
    starts, i = [], m
    for k in range(num_layers, 0, -1):
        j = int(parent[k, i]) if k > 1 else 0
        starts.append(j)
        i = j
    return best[num_layers, m], sorted(starts)


def layer_flops(flops, starts: list[int]) -> list[float]:
    """Flops of each layer given the start indices."""
    flops = np.asarray(flops, dtype=float)
    bounds = list(starts) + [len(flops)]
    return [float(flops[a:b].sum()) for a, b in zip(bounds, bounds[1:])]


def imbalance(flops, starts: list[int]) -> float:
    """max layer flops / mean layer flops (1.0 is perfect balance)."""
    per = layer_flops(flops, starts)
    mean = sum(per) / len(per)
    return max(per) / mean if mean > 0 else 1.0


def group_by_names(names: list[str | None], flops, num_layers: int) -> list[int] | None:
    """Layers from module names: consecutive equations of one named module stay together.

    ``names[i]`` is the module (e.g. ``"block_3"``) equation ``i`` belongs to, or None for
    equations outside any repeated module (they join the module before them). The module runs
    are then merged into ``num_layers`` layers of balanced flops. Returns None when there are
    fewer named modules than layers.
    """
    run_starts, current = [], object()
    for i, name in enumerate(names):
        if name is not None and name != current:
            run_starts.append(i)
            current = name
    if len(run_starts) < num_layers:
        return None
    run_starts[0] = 0
    flops = np.asarray(flops, dtype=float)
    bounds = run_starts + [len(flops)]
    run_flops = [float(flops[a:b].sum()) for a, b in zip(bounds, bounds[1:])]
    chosen = cluster_layers(run_flops, np.zeros(len(run_flops) - 1), num_layers)
    return [run_starts[i] for i in chosen]
