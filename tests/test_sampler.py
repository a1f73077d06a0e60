"""Sampler contract: indices (M,), unique, in range, M = ceil(ratio * N); coreset = reference."""

import math

import pytest
import torch

from defectlab.components import CoresetSampler, IdentitySampler, RandomSampler
from defectlab.errors import ConfigError


@pytest.mark.parametrize(
    "sampler",
    [
        IdentitySampler(),
        RandomSampler(0.13, seed=1),
        CoresetSampler(0.13, projection_dim=8, progress=False),
    ],
    ids=["none", "random", "coreset"],
)
def test_sampler_contract(sampler):
    features = torch.randn(301, 32)
    idx = sampler(features)
    assert idx.dtype == torch.long and idx.ndim == 1
    assert len(idx) == math.ceil(sampler.ratio * 301)
    assert len(idx.unique()) == len(idx)
    assert idx.min() >= 0 and idx.max() < 301


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_ratio_outside_unit_interval_is_a_config_error(ratio):
    for cls in (RandomSampler, CoresetSampler):
        with pytest.raises(ConfigError, match=r"sampler.ratio"):
            cls(ratio)


def _reference_greedy(z: torch.Tensor, m: int, anchors: torch.Tensor) -> list[int]:
    """Literal greedy k-center: start from mean anchor distance, add the farthest point each step."""
    min_d = torch.stack([(z - z[a]).norm(dim=1) for a in anchors]).mean(0)
    chosen = []
    for _ in range(m):
        j = int(min_d.argmax())
        chosen.append(j)
        min_d = torch.minimum(min_d, (z - z[j]).norm(dim=1))
    return chosen


@pytest.mark.parametrize("candidates", [1, 7, 64, 10_000])
def test_coreset_matches_straightforward_reference(candidates):
    """Same seed -> same indices in the same order as the literal loop, however often the
    deferred updates run (candidates=1 forces one every pick, 10_000 > N never needs one)."""
    features = torch.randn(2000, 64, dtype=torch.float64).float()
    sampler = CoresetSampler(
        ratio=0.1,
        projection_dim=16,
        num_starting_points=5,
        seed=7,
        candidates=candidates,
        progress=False,
    )
    z = sampler.project(features).double()
    anchors = torch.randperm(2000, generator=torch.Generator().manual_seed(8))[:5]
    assert sampler(features).tolist() == _reference_greedy(z, 200, anchors)
    assert sampler(features).tolist() == sampler(features).tolist()  # same seed, same indices


def test_coreset_projects_a_float16_buffer_blockwise():
    features = torch.randn(40_000, 64).half()
    sampler = CoresetSampler(projection_dim=16, progress=False)
    z = sampler.project(features)
    assert z.dtype == torch.float32
    g = torch.Generator().manual_seed(sampler.seed)
    proj = torch.randn(64, 16, generator=g) / 4.0
    torch.testing.assert_close(z, features.float() @ proj)


def test_coreset_candidates_must_be_positive():
    with pytest.raises(ConfigError, match=r"sampler.candidates"):
        CoresetSampler(candidates=0)


def test_coreset_covers_better_than_random():
    """The point of k-center: the max distance to the nearest selected point is smaller."""
    features = torch.cat([torch.randn(400, 8), torch.randn(20, 8) + 12])  # a small far cluster

    def radius(idx):
        return torch.cdist(features, features[idx]).min(1).values.max()

    core = CoresetSampler(0.05, projection_dim=0, progress=False)(features)
    rand = RandomSampler(0.05, seed=0)(features)
    assert radius(core) < radius(rand)
