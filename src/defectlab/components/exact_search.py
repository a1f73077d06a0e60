"""Exact k-nearest-neighbour search: blockwise matrix products, low precision certified by a bound.

The search never holds the full queries x bank distance matrix. It runs in two passes:

1. *Products.* For each block of bank rows, one matrix product gives every query's approximate
   score ``y ~ -||q - b||^2 / 2`` (up to a per-query constant) for the block's rows, in bfloat16 on
   CPUs where that is measured faster, float16 on CUDA, float32 otherwise. Only each group of
   ``GROUP_ROWS`` rows' maximum score is kept (and each block's top-k of those).
2. *Certification.* A rigorous bound ``E`` on the error of a score (:func:`_low_precision_bound`,
   :func:`_fp32_bound`) gives a lower bound on the k-th best true score, and so a threshold below
   which no row can be among the k nearest. Only the row groups whose maximum reaches it are
   candidates. Their distances are measured directly, ``||q - b||`` in float32, and in float64
   where two candidates' float32 distances are too close to order, so the result is the float64
   brute force's: the same indices, and distances rounded from float64.

Ties (equal float64 distances, e.g. duplicate bank rows) go to the lower bank index.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

import torch

U32 = 2.0**-24  # float32 unit roundoff
# Rows per group whose maximum score pass 1 keeps: the candidates are whole groups, so their
# number per query is about GROUP_ROWS x (groups near the k-th neighbour). Measured on ELPV
# lite0 banks (784 queries): the group maxima cost the same for 4 to 32 rows; fewer rows per group
# leave fewer candidates to measure.
GROUP_ROWS = 4
# Bytes of group maxima kept per query chunk (sets the queries per chunk on large banks).
GROUP_STATS_BYTES = 32 * 2**20
# Bytes of candidate bank rows gathered at once to measure their distances.
RANK_BYTES = 8 * 2**20
LOW_PRECISION = {"cpu": torch.bfloat16, "cuda": torch.float16}
# Input unit roundoff, and the absolute error of an element below the normal range (flushed
# to zero by the bfloat16 dot-product instructions; float16 subnormal spacing 2^-24, halved).
_UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: U32}
_TINY = {torch.bfloat16: 2.0**-126, torch.float16: 2.0**-25, torch.float32: 2.0**-126}


def _gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error of any float32 sum of n terms."""
    return n * U32 / (1 - n * U32)


def _low_precision_bound(
    x_norm: torch.Tensor, w_norm: torch.Tensor, dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Bound ``E(x, w)`` on ``|y_hat - (-||x - w||^2 / 2)|`` for the low-precision product.

    With x = sigma (q - c), w = sigma (b - c) (centre c, power-of-two scale sigma, both exact),
    x_hat = lp(x), w_hat = lp(w) with |x_hat_i - x_i| <= u~|x_i| + eta (u~ = u + 2 u32 covers
    the float32 centring of q and a double rounding float64 -> float32 -> lp of w), and the bias
    columns h + l = lp-split of -||.||^2 / 2 (error <= 2 u~^2 ||.||^2 / 2, plus gamma_{D+2} for
    the query's float32 sum of squares and centring):

        |x_hat . w_hat - x . w| <= (2u~ + u~^2) ||x|| ||w|| + eta (1 + u~) sqrt(D) (||x|| + ||w||)
                                   + D eta^2                           (Cauchy-Schwarz)
        float32 accumulation of D + 4 exact products <= gamma_{D+4} T,
        T = ((1 + u~)||x|| + eta sqrt(D)) ((1 + u~)||w|| + eta sqrt(D))
            + (1 + 2u~) (||x||^2 + ||w||^2) / 2                        (any summation order)
        flushed products: (D + 4) 2^-126.

    Output rounding (bfloat16 on CPU) is handled by the caller: |v - y_hat| <= u/(1-u) |y_hat|.
    Arguments are float64 norms that broadcast; monotone in both, so a block's largest ``w_norm``
    bounds all its rows.
    """
    u = _UNIT[dtype] + 2 * U32
    eta = _TINY[dtype]
    root = math.sqrt(dim)
    product = (2 * u + u * u) * x_norm * w_norm
    product = product + eta * (1 + u) * root * (x_norm + w_norm) + dim * eta * eta
    squares = (x_norm.square() + w_norm.square()) / 2
    total = ((1 + u) * x_norm + eta * root) * ((1 + u) * w_norm + eta * root)
    total = total + (1 + 2 * u) * squares
    bias = (2 * u * u + _gamma(dim + 2)) * squares
    return product + bias + _gamma(dim + 4) * total + (dim + 4) * 2.0**-126


def _fp32_bound(q_norm: torch.Tensor, b_norm: torch.Tensor, dim: int) -> torch.Tensor:
    """Bound on ``|y_hat - (q . b - ||b||^2 / 2)|`` for ``addmm(-||b||^2/2, b, q)`` in float32.

    The inputs are exact; the bias is float64 rounded once (u32 ||b||^2 / 2); the product and the
    bias add are a float32 sum of D + 1 terms: gamma_{D+1} (||q|| ||b|| + ||b||^2 / 2) (Cauchy-
    Schwarz), plus flushed subnormal products (D + 1) 2^-126.
    """
    half = b_norm.square() / 2
    return (
        _gamma(dim + 2) * (q_norm * b_norm + half) * (1 + U32) + U32 * half + (dim + 1) * 2.0**-126
    )


@functools.cache
def _cpu_cache_bytes(level: int) -> int | None:
    """Size of one core's data/unified cache at ``level`` (Linux sysfs), None if unknown."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in root.glob("index*"):
            kind = (index / "type").read_text().strip()
            if int((index / "level").read_text()) == level and kind in ("Data", "Unified"):
                text = (index / "size").read_text().strip().upper()
                scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
                return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        return None
    return None


def default_block_rows(device: torch.device, queries: int, itemsize: int) -> int:
    """Bank rows per product: the ``(rows, queries)`` output tile fills the threads' L2 caches.

    Pass 1 reads each tile right after the product writes it (the group maxima), while it is in
    the L2 caches of the cores that wrote it. Measured on ELPV (25k x 152 bank, 784 queries, one
    thread): 24.4-25.8 ms per image for 0.5-2 MB tiles, 28 / 40 / 62 ms for 4 / 8 / 16 MB; this
    CPU has 1 MB of L2 per core. On CUDA, tiles of up to 2^26 values amortise kernel launches.
    """
    if device.type == "cuda":
        rows = 2**26 // max(queries, 1)
    else:
        l2 = _cpu_cache_bytes(2) or 2**20
        rows = l2 * torch.get_num_threads() // (max(queries, 1) * itemsize)
    rows = max(256, min(rows, 2**20 if device.type == "cuda" else 16384))
    return rows - rows % GROUP_ROWS


def _time(fn, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def low_precision_is_faster(device_type: str, dim: int, threads: int) -> bool:
    """Whether pass 1 runs faster in low precision than in float32, measured once per process.

    bfloat16 products use AMX tiles or AVX-512-BF16 where the CPU has them (4x float32 here at
    D = 152 and 1024) and are emulated, slower, where it has not; so this times both products
    on a pass-1-sized problem instead of reading CPU flags. Low precision must win by 25 %: its
    candidate sets are wider.
    """
    del threads  # part of the cache key: the answer can change with the thread count
    dtype = LOW_PRECISION.get(device_type)
    if dtype is None:
        return False
    device = torch.device(device_type)
    gen = torch.Generator(device=device).manual_seed(0)
    rows, queries = 2048, 512
    bank = torch.randn(rows, dim, generator=gen, device=device)
    query = torch.randn(queries, dim, generator=gen, device=device)
    bias = torch.randn(rows, 1, generator=gen, device=device)
    low_bank = torch.randn(rows, dim + 4, generator=gen, device=device).to(dtype)
    low_query = torch.randn(queries, dim + 4, generator=gen, device=device).to(dtype)

    def sync(fn):
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    try:
        low = _time(sync(lambda: _low_product(low_bank, low_query)))
    except RuntimeError:  # no kernel for this dtype here
        return False
    full = _time(sync(lambda: torch.addmm(bias, bank, query.T)))
    return low < 0.75 * full


@contextlib.contextmanager
def _faithful_products():
    """Matrix products as the bounds assume them, whatever the process set, then restored.

    float32 products in IEEE float32 (``torch.set_float32_matmul_precision("high")`` would let
    CUDA use TF32 and oneDNN bfloat16 inside them) and half-precision CUDA products accumulated
    in float32 (no reduced-precision reductions).
    """
    backends = (torch.backends.mkldnn.matmul, torch.backends.cuda.matmul)
    saved = [b.fp32_precision for b in backends]
    cuda = torch.backends.cuda.matmul
    reduced = (
        cuda.allow_fp16_reduced_precision_reduction,
        cuda.allow_bf16_reduced_precision_reduction,
    )
    try:
        for backend in backends:
            backend.fp32_precision = "ieee"
        cuda.allow_fp16_reduced_precision_reduction = False
        cuda.allow_bf16_reduced_precision_reduction = False
        yield
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value
        cuda.allow_fp16_reduced_precision_reduction = reduced[0]
        cuda.allow_bf16_reduced_precision_reduction = reduced[1]


def _low_product(
    bank_rows: torch.Tensor, queries: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``bank_rows @ queries.T`` in low precision: float32 output on CUDA, bfloat16 on CPU."""
    if bank_rows.is_cuda:  # fp32 accumulation and output: no fp16 reduced-precision reduction
        return torch.mm(bank_rows, queries.T, out_dtype=torch.float32)
    return torch.mm(bank_rows, queries.T, out=out)


class ExactSearch:
    """Exact k-nearest-neighbour search over a fixed ``(M, D)`` float32 bank.

    Args:
        bank: the rows searched; kept by reference (no copy).
        precision: ``auto`` (low precision where measured faster, see
            :func:`low_precision_is_faster`), ``float32``, ``bfloat16`` (CPU) or ``float16``
            (CUDA). Results are the same for all; only speed differs.
        block_rows: bank rows per product (None = :func:`default_block_rows`).
        query_rows: queries per chunk (None = as many as keep the group maxima within
            ``GROUP_STATS_BYTES``, at least 256).
    """

    PRECISIONS = ("auto", "float32", "bfloat16", "float16")

    def __init__(
        self,
        bank: torch.Tensor,
        precision: str = "auto",
        block_rows: int | None = None,
        query_rows: int | None = None,
    ) -> None:
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision={precision}: choose one of {self.PRECISIONS}")
        self.bank = bank if bank.dtype == torch.float32 else bank.float()
        self.block_rows, self.query_rows = block_rows, query_rows
        dim = self.bank.shape[1]
        device = self.bank.device
        # Row norms in float64, a slice at a time (no float64 copy of the bank).
        norm = torch.cat([_norms64(part) for part in self._slices()])
        # float32 path: -||b||^2 / 2 as the product's bias; no copy of the bank.
        self._bias = (-norm.square() / 2).float().unsqueeze(1)
        self._norm = norm
        if precision == "auto":
            fast = low_precision_is_faster(device.type, dim, torch.get_num_threads())
            precision = (
                str(LOW_PRECISION[device.type]).removeprefix("torch.") if fast else "float32"
            )
        self.dtype = getattr(torch, precision)
        self._low_bank = None
        if self.dtype != torch.float32:
            self._prepare_low()

    def _slices(self) -> list[torch.Tensor]:
        """The bank in row slices of about ``RANK_BYTES`` (for float64 work on bounded memory)."""
        step = max(1, RANK_BYTES // (self.bank.shape[1] * 8))
        return list(self.bank.split(step))

    def _prepare_low(self) -> None:
        """The centred, scaled, low-precision bank with its two bias columns and two ones."""
        rows, dim = self.bank.shape
        total = sum(part.double().sum(0) for part in self._slices())
        self._centre = (total / rows).float()  # an exact float32 point: ||q - b|| is unchanged
        centre = self._centre.double()
        norm = torch.cat([_norms64(part.double() - centre) for part in self._slices()])
        # float16 range: scale by a power of two (exact) so that |w|_max <= 2^7 and ||w||^2/2
        # fits; bfloat16 has float32's range.
        top = float(norm.max())
        exponent = 0 if self.dtype == torch.bfloat16 else 7 - math.ceil(math.log2(max(top, 1e-30)))
        self._scale = 2.0**exponent
        self._w_norm = norm * self._scale
        half = -(self._w_norm.square()) / 2
        high = half.to(self.dtype)
        low = torch.empty(rows, dim + 4, dtype=self.dtype, device=self.bank.device)
        start = 0
        for part in self._slices():  # (b - c) sigma in float64, rounded once
            low[start : start + len(part), :dim] = (part.double() - centre) * self._scale
            start += len(part)
        low[:, dim] = high
        low[:, dim + 1] = (half - high.double()).to(self.dtype)
        low[:, dim + 2 :] = 1
        self._low_bank = low

    # ---- pass 1 ---------------------------------------------------------------------------

    def _chunk_rows(self, queries: int) -> int:
        if self.query_rows:
            return self.query_rows
        groups = math.ceil(len(self.bank) / GROUP_ROWS)
        return max(256, GROUP_STATS_BYTES // (groups * 4))

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances and indices, each ``(Q, k)``, of the ``k`` nearest bank rows (ties: lower index)."""
        if not 1 <= k <= len(self.bank):
            raise ValueError(f"k={k} must be between 1 and the bank size {len(self.bank)}")
        queries = queries.float()
        if len(queries) == 0:
            empty = queries.new_empty(0, k)
            return empty, empty.long()
        step = self._chunk_rows(len(queries))
        with _faithful_products():
            parts = [self._search_chunk(chunk, k) for chunk in queries.split(step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _search_chunk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._low_bank is None:
            return self._rank(queries, *self._candidates(*self._pass1_fp32(queries, k), k), k)
        low = self._low_queries(queries)
        fits = self._fits(low[1])
        if bool(fits.all()):
            return self._rank(queries, *self._candidates(*self._pass1_low(low, k), k), k)
        ids, rest = fits.nonzero()[:, 0], (~fits).nonzero()[:, 0]
        q1, r1 = self._candidates(*self._pass1_low((low[0][ids], low[1][ids]), k), k)
        q2, r2 = self._candidates(*self._pass1_fp32(queries[rest], k), k)
        query, rows = torch.cat([ids[q1], rest[q2]]), torch.cat([r1, r2])
        return self._rank(queries, query, rows, k)

    def _pass1(self, product, norms, bound, n: int, k: int, dtype: torch.dtype, out_unit: float):
        """Group maxima ``(blocks, groups, n)`` and each block's top-k of them ``(blocks, k, n)``."""
        rows = len(self.bank)
        block = self.block_rows or default_block_rows(self.bank.device, n, dtype.itemsize)
        block = max(GROUP_ROWS, block - block % GROUP_ROWS)
        blocks = math.ceil(rows / block)
        groups = block // GROUP_ROWS
        device = self.bank.device
        maxima = torch.empty(blocks, groups, n, dtype=dtype, device=device)
        maxima[-1, math.ceil((rows - (blocks - 1) * block) / GROUP_ROWS) :] = -math.inf
        # One output tile, reused: a fresh megabyte-sized tensor per product is a fresh mapping
        # from the OS on CPU (page faults on every block). CUDA's allocator caches its own.
        tile = None if device.type == "cuda" else torch.empty(block, n, dtype=dtype, device=device)
        for b in range(blocks):
            start, stop = b * block, min(rows, (b + 1) * block)
            y = product(start, stop, None if tile is None else tile[: stop - start])
            whole = (stop - start) // GROUP_ROWS * GROUP_ROWS
            torch.amax(
                y[:whole].view(-1, GROUP_ROWS, n), dim=1, out=maxima[b, : whole // GROUP_ROWS]
            )
            if whole < stop - start:
                maxima[b, whole // GROUP_ROWS] = y[whole:].amax(0)
        # Each block's top-k group maxima, all blocks in one call.
        top = maxima.topk(min(k, groups), dim=1).values if k > 1 else maxima.amax(1, keepdim=True)
        return maxima, top, bound(_block_maxima(norms, block)), block, out_unit

    def _low_queries(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries as the low-precision product reads them, and upper bounds of their norms."""
        n, dim = queries.shape
        x = (queries - self._centre).mul_(self._scale)  # exact scaling; centring rounds <= u32
        square = torch.linalg.vecdot(x, x).double()  # float32 sum: relative error <= gamma_D
        x_norm = (square * (1 + _gamma(dim))).sqrt()
        half = -square / 2
        high = half.to(self.dtype)
        xq = torch.empty(n, dim + 4, dtype=self.dtype, device=x.device)
        xq[:, :dim] = x
        xq[:, dim : dim + 2] = 1
        xq[:, dim + 2] = high
        xq[:, dim + 3] = (half - high.double()).to(self.dtype)
        return xq, x_norm

    def _fits(self, x_norm: torch.Tensor) -> torch.Tensor:
        """Queries whose products stay in float16's range (all, for bfloat16)."""
        if self.dtype != torch.float16:
            return torch.isfinite(x_norm)
        # |x_i| <= ||x|| and ||x||^2 / 2 (the bias column) both below 2^15 (max 65504)
        return x_norm < 2.0**7.5

    def _pass1_low(self, low_queries: tuple[torch.Tensor, torch.Tensor], k: int):
        xq, x_norm = low_queries
        dim = xq.shape[1] - 4

        def product(start, stop, out):
            return _low_product(self._low_bank[start:stop], xq, out)

        out_dtype = torch.float32 if xq.is_cuda else self.dtype
        out_unit = 0.0 if xq.is_cuda else _UNIT[self.dtype]
        # x_norm is measured on the float32 centring of q: inflated by 2^-20 for its rounding;
        # an output below the normal range rounds by up to the output's tiny.
        x_bound = x_norm[None] * (1 + 2.0**-20)

        def bound(block_norm):
            error = _low_precision_bound(x_bound, block_norm[:, None], dim, self.dtype)
            return error + _TINY[out_dtype]

        return self._pass1(product, self._w_norm, bound, len(xq), k, out_dtype, out_unit)

    def _pass1_fp32(self, queries: torch.Tensor, k: int):
        q_norm = queries.double().square().sum(1).sqrt()
        dim = queries.shape[1]

        def product(start, stop, out):
            return torch.addmm(self._bias[start:stop], self.bank[start:stop], queries.T, out=out)

        def bound(block_norm):
            return _fp32_bound(q_norm[None], block_norm[:, None], dim)

        return self._pass1(product, self._norm, bound, len(queries), k, torch.float32, 0.0)

    # ---- pass 2 ---------------------------------------------------------------------------

    def _candidates(self, maxima, top, error, block, out_unit, k):
        """``(query, first row)`` of every row group that can hold one of a query's k nearest.

        Every kept score y_hat is within ``error + u' |y_hat|`` of its true value (u' from the
        output rounding), a monotone band. Each block's top-k group maxima belong to distinct
        rows whose true score is at least ``y_hat - u'|y_hat| - E``: the k-th largest of those,
        ``lower``, bounds the k-th best true score from below. A row can only be among the k best
        if ``y_hat + u'|y_hat| + E >= lower``; groups whose maximum fails it are out.
        """
        u = out_unit / (1 - out_unit)
        top64 = top.double()
        reach = top64 - error[:, None]  # (blocks, k, n); padding groups are -inf
        if u:  # (not 0 * inf)
            reach = reach - u * top64.abs()
        blocks, kk, n = reach.shape
        flat = reach.permute(2, 0, 1).reshape(n, blocks * kk)
        if flat.shape[1] < k:  # fewer row groups than k: every row is a candidate
            lower = flat.new_full((n,), -math.inf)
        else:
            lower = flat.topk(k, dim=1).values[:, -1] if k > 1 else flat.amax(1)
        # f(y) = y + u|y| is increasing; the threshold on y_hat is f^-1(lower - E), widened by a
        # relative 1e-9 for the float64 arithmetic of the bound itself.
        need = lower[None] - error  # (blocks, n)
        need = need - 1e-9 * need.abs() - 1e-30
        threshold = torch.where(need >= 0, need / (1 + u), need / (1 - u))
        hit_blocks = top64[:, 0] >= threshold
        b_idx, q_idx = hit_blocks.nonzero(as_tuple=True)
        groups = maxima.shape[1]
        # maxima[b_idx, :, q_idx] as a gather of flat offsets (indexing around a slice copies all)
        offsets = (b_idx * groups * n + q_idx)[:, None] + n * torch.arange(
            groups, device=b_idx.device
        )
        group_max = maxima.view(-1)[offsets].double()  # (pairs, groups)
        pair, group = (group_max >= threshold[b_idx, q_idx][:, None]).nonzero(as_tuple=True)
        return q_idx[pair], b_idx[pair] * block + group * GROUP_ROWS

    def _rank(self, queries, query, start, k):
        """The k nearest rows of each query's candidate groups ``(query, first row)``.

        float32 ``||q - b||^2`` measured directly (each difference, square and the sum rounds):
        relative error <= rho. Every candidate whose float32 distance cannot be told from the
        k-th smallest is measured again in float64, and the k best of those are returned.
        """
        n, dim = queries.shape
        d32 = self._group_distances(queries, query, start)  # (groups, GROUP_ROWS)
        rows = (start[:, None] + torch.arange(GROUP_ROWS, device=start.device)).flatten()
        query, d32 = query.repeat_interleave(GROUP_ROWS), d32.flatten()
        valid = rows < len(self.bank)  # the last group may be short
        query, rows, d32 = query[valid], rows[valid], d32[valid]
        rho = 2 * _gamma(dim + 3)
        if k == 1:
            kth = torch.full((n,), math.inf, device=d32.device).scatter_reduce(
                0, query, d32, "amin"
            )
        else:
            order = _sort_by(query, d32)
            counts = torch.bincount(query, minlength=n)
            kth = d32[order][torch.cumsum(counts, 0) - counts + k - 1]
        band = d32 * (1 - rho) <= (kth * (1 + rho))[query]
        query, rows = query[band], rows[band]
        d64 = self._pair_distances64(queries, query, rows)
        if k == 1:  # smallest float64 distance per query, ties to the lower row
            best = torch.full((n,), math.inf, dtype=d64.dtype, device=d64.device)
            best = best.scatter_reduce(0, query, d64, "amin")
            tied = d64 == best[query]
            pick = torch.full((n,), len(self.bank), dtype=rows.dtype, device=rows.device)
            pick = pick.scatter_reduce(0, query[tied], rows[tied], "amin")
            return best.sqrt().float()[:, None], pick[:, None]
        order = _sort_by(query, d64, rows)
        query, rows, d64 = query[order], rows[order], d64[order]
        counts = torch.bincount(query, minlength=n)
        first = torch.cumsum(counts, 0) - counts
        pick = (first[:, None] + torch.arange(k, device=first.device)).flatten()
        return d64[pick].sqrt().float().view(n, k), rows[pick].view(n, k)

    def _group_distances(self, queries, query, start) -> torch.Tensor:
        """float32 ``||q - b||^2`` of each group's rows ``(groups, GROUP_ROWS)``, in slices.

        Each slice gathers at most ``RANK_BYTES`` of bank rows (bounded memory, reused buffer)
        and each query once per group, not once per row.
        """
        rows, dim = self.bank.shape
        offsets = torch.arange(GROUP_ROWS, device=start.device)
        step = max(1, RANK_BYTES // (GROUP_ROWS * dim * 4))
        out = torch.empty(len(start), GROUP_ROWS, device=start.device)
        buffer = torch.empty(min(step, len(start)) * GROUP_ROWS, dim, device=start.device)
        for i in range(0, len(start), step):
            ids = (start[i : i + step, None] + offsets).clamp_max(rows - 1).flatten()
            part = torch.index_select(self.bank, 0, ids, out=buffer[: len(ids)])
            part = part.view(-1, GROUP_ROWS, dim)
            part.sub_(queries.index_select(0, query[i : i + step]).unsqueeze(1))
            torch.linalg.vecdot(part, part, out=out[i : i + step])
        return out

    def _pair_distances64(self, queries, query, rows) -> torch.Tensor:
        """float64 ``||q - b||^2`` per ``(query, row)`` pair, in slices of ``RANK_BYTES``."""
        step = max(1, RANK_BYTES // (self.bank.shape[1] * 8))
        parts = []
        for i in range(0, len(rows), step):
            diff = self.bank.index_select(0, rows[i : i + step]).double()
            diff -= queries.index_select(0, query[i : i + step])
            parts.append(torch.linalg.vecdot(diff, diff))
        return torch.cat(parts) if parts else queries.new_empty(0, dtype=torch.float64)


def _norms64(rows: torch.Tensor) -> torch.Tensor:
    """float64 Euclidean norms of ``rows`` (any float dtype)."""
    rows = rows.double()
    return torch.linalg.vecdot(rows, rows).sqrt()


def _block_maxima(norms: torch.Tensor, block: int) -> torch.Tensor:
    """Largest row norm of each block, inflated by 2^-20 (relative) for the float32 centring."""
    padded = torch.nn.functional.pad(norms, (0, -len(norms) % block))
    return padded.view(-1, block).amax(1) * (1 + 2.0**-20)


def _sort_by(
    query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Permutation sorting by query, then key, then row (stable sorts, least significant first)."""
    order = torch.arange(len(query), device=query.device)
    if rows is not None:
        order = rows.argsort(stable=True)
    order = order[key[order].argsort(stable=True)]
    return order[query[order].argsort(stable=True)]
