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


def test_exact_faiss_search_reads_the_bank_in_place():
    # faiss.knn on the bank's memory: no second copy of a ~100 MB bank inside a faiss index
    bank = torch.randn(300, 24)
    knn = NearestNeighbors("faiss").fit(bank)
    assert knn._flat.ctypes.data == bank.data_ptr()
    # a bank that is not contiguous float32 on the CPU is copied once, and still searched exactly
    strided = torch.randn(24, 300).T
    dist, idx = NearestNeighbors("faiss").fit(strided).search(strided[:5], k=1)
    assert torch.equal(idx[:, 0], torch.arange(5)) and torch.all(dist < 1e-3)


def test_k_larger_than_bank_and_bad_backend_are_config_errors():
    knn = NearestNeighbors("torch").fit(torch.randn(5, 3))
    with pytest.raises(ConfigError, match="memory bank size 5"):
        knn.search(torch.randn(2, 3), k=6)
    with pytest.raises(ConfigError, match="model.knn.backend"):
        NearestNeighbors("annoy")


def test_ivf_probing_every_cell_and_wide_hnsw_are_exact():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(2000, 16, generator=g), torch.randn(50, 16, generator=g)
    ref_d, ref_i = torch.cdist(queries.double(), bank.double()).topk(3, largest=False)
    for knn in (
        NearestNeighbors("ivf", nlist=16, nprobe=16),
        NearestNeighbors("hnsw", hnsw_m=16, ef_search=2000),
    ):
        dist, idx = knn.fit(bank).search(queries, k=3)
        assert torch.equal(idx, ref_i), knn.backend
        torch.testing.assert_close(dist.double(), ref_d, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("refine", [1, 2])
def test_approximate_search_never_beats_exact_and_fills_short_probes(refine):
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(4000, 32, generator=g), torch.randn(200, 32, generator=g)
    exact, _ = NearestNeighbors("torch").fit(bank).search(queries, k=1)
    # 50 cells of ~80 points, one probed: k=100 cannot be met from one cell -> exact fallback.
    knn = NearestNeighbors("ivf", nlist=50, nprobe=1, refine=refine).fit(bank)
    dist, idx = knn.search(queries, k=1)
    assert (dist >= exact - 1e-4).all() and (dist > exact + 1e-4).any()  # approximate: some miss
    dist, idx = knn.search(queries, k=100)
    assert (idx >= 0).all() and (idx < len(bank)).all()
    assert all(len(set(row)) == 100 for row in idx.tolist())
    direct = torch.linalg.vector_norm(queries[:, None] - bank[idx], dim=-1)
    torch.testing.assert_close(dist, direct)


def test_bad_index_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="model.knn.nprobe"):
        NearestNeighbors("ivf", nprobe=0)
    with pytest.raises(ConfigError, match="model.knn.hnsw_m"):
        NearestNeighbors("hnsw", hnsw_m=1)
    with pytest.raises(ConfigError, match="model.knn.refine"):
        NearestNeighbors("ivf", refine=0)
    with pytest.raises(ConfigError, match="pca_dim / refine apply to the approximate"):
        NearestNeighbors("faiss", pca_dim=8)
    with pytest.raises(ConfigError, match="model.knn.pca_dim=32 must be below"):
        NearestNeighbors("ivf", pca_dim=32).fit(torch.randn(100, 32))


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_pca_search_with_exact_refine(backend):
    # Patch features have most of their variance in few directions: 6-d structure in 48-d.
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(6, 48, generator=g)
    bank = torch.randn(3000, 6, generator=g) @ basis + 0.3 * torch.randn(3000, 48, generator=g)
    queries = torch.randn(300, 6, generator=g) @ basis + 0.3 * torch.randn(300, 48, generator=g)
    exact, exact_idx = NearestNeighbors("torch").fit(bank).search(queries, k=1)
    opts = {"nlist": 20, "nprobe": 20} if backend == "ivf" else {"ef_search": 256}
    hits = {}
    for refine in (1, 8):
        knn = NearestNeighbors(backend, pca_dim=5, refine=refine, **opts).fit(bank)
        dist, idx = knn.search(queries, k=1)
        assert torch.allclose(
            dist, torch.linalg.vector_norm(queries - bank[idx[:, 0]], dim=1)[:, None]
        )
        assert (dist >= exact - 1e-4).all()
        hits[refine] = (idx == exact_idx).float().mean().item()
    # 5 of the 6 directions alone miss most neighbours; exact re-ranking of 8 candidates finds them.
    assert hits[1] < 0.5 and hits[8] > 0.9
