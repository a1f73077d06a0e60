"""Nearest-neighbour search equals brute force on both backends."""

import pytest
import torch

from defectlab.components import NearestNeighbors
from defectlab.errors import ConfigError


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("k", [1, 4])
def test_search_equals_brute_force(backend, k):
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 24, generator=g), torch.randn(77, 24, generator=g)
    knn = NearestNeighbors(backend, chunk_size=16).fit(bank)
    dist, idx = knn.search(queries, k=k)
    ref_d, ref_i = torch.cdist(queries.double(), bank.double()).topk(k, largest=False)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, atol=1e-4, rtol=1e-4)


def test_k_larger_than_bank_and_bad_backend_are_config_errors():
    knn = NearestNeighbors("torch").fit(torch.randn(5, 3))
    with pytest.raises(ConfigError, match="memory bank size 5"):
        knn.search(torch.randn(2, 3), k=6)
    with pytest.raises(ConfigError, match="model.knn.backend"):
        NearestNeighbors("annoy")
