"""Layer clustering (numbers only) against brute force, and layer markers under jax.grad."""

import itertools

import numpy as np
import pytest

from alpa_lite.inter_op.layering import cluster_layers, group_by_names, imbalance, layer_flops


def brute_force(flops, cut, num_layers, eps=0.5):
    while True:
        limit = (1 + eps) * flops.sum() / num_layers + 1e-9 * max(flops.sum(), 1.0)
        best = None
        for cuts in itertools.combinations(range(1, len(flops)), num_layers - 1):
            starts = [0, *cuts]
            per = layer_flops(flops, starts)
            if max(per) > limit:
                continue
            key = (max([cut[j - 1] for j in cuts], default=0.0), max(per),
                   sum(cut[j - 1] for j in cuts))
            if best is None or key < best[0]:
                best = (key, starts)
        if best is not None:
            return best
        eps *= 2


@pytest.mark.parametrize("seed", range(25))
def test_cluster_layers_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 10))
    num_layers = int(rng.integers(1, n + 1))
    flops = rng.uniform(0, 5, n).round(1)
    cut = rng.uniform(0, 5, n - 1).round(1)
    starts = cluster_layers(flops, cut, num_layers)
    key, _ = brute_force(flops, cut, num_layers)
    per = layer_flops(flops, starts)
    got = (max([cut[j - 1] for j in starts[1:]], default=0.0), max(per),
           sum(cut[j - 1] for j in starts[1:]))
    assert len(starts) == num_layers and starts[0] == 0
    np.testing.assert_allclose(got, key, rtol=1e-9, atol=1e-9)


def test_cuts_fall_on_cheap_boundaries():
    flops = np.ones(12)
    cut = np.full(11, 10.0)
    cut[[3, 7]] = 1.0  # boundaries after equations 3 and 7 carry little data
    assert cluster_layers(flops, cut, 3) == [0, 4, 8]


def test_long_sequences_are_fast_and_balanced():
    rng = np.random.default_rng(0)
    flops, cut = rng.uniform(0, 10, 3000), rng.uniform(0, 100, 2999)
    starts = cluster_layers(flops, cut, 24)
    assert len(starts) == 24 and imbalance(flops, starts) <= 1.5 + 1e-9


def test_group_by_names_keeps_modules_whole():
    names = [None, "block_0", "block_0", "block_1", "block_1", "block_2", "block_2", None]
    starts = group_by_names(names, np.ones(8), 3)
    assert starts == [0, 3, 5]
    assert group_by_names(names, np.ones(8), 4) is None
