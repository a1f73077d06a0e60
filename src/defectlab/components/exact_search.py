"""Exact k-nearest-neighbour search: blockwise matrix products, low precision certified by a bound.

The search never holds the full queries x bank distance matrix. It runs in two passes:

1. *Products.* For each block of bank rows, one matrix product gives every query's approximate
   half squared distance ``v ~ ||q - b||^2 / 2`` (up to a per-query constant) for the block's
   rows, in bfloat16 on CPUs where that is measured faster, float16 on CUDA, float32 otherwise.
   Only each group of ``GROUP_ROWS`` rows' minimum is kept (and each block's k smallest of those).
   The score ranked below is ``y = -v``.
2. *Certification.* A rigorous bound ``E`` on the error of a score (``components/rounding.py``)
   gives a lower bound on the k-th best true score, and so a threshold below which no row can be
   among the k nearest. Only the row groups whose best score reaches it are
   candidates. Their distances are measured directly, ``||q - b||`` in float32, and in float64
   where two candidates' float32 distances are too close to order, so the result is the float64
   brute force's: the same indices, and distances rounded from float64.

Ties (equal float64 distances, e.g. duplicate bank rows) go to the lower bank index.

On CPU the group minima and, for k = 1, the candidates and their ranking run as compiled numba
kernels (``components/search_kernels.py``: fewer passes over memory, no index tensors); torch
operations do the same work on CUDA, for k > 1, and with ``kernels="torch"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from defectlab.components import search_kernels
from defectlab.components.products import (
    LOW_PRECISION,
    default_block_rows,
    faithful_products,
    low_precision_is_faster,
    low_product,
)
from defectlab.components.rounding import TINY, UNIT, fp32_bound, gamma, low_precision_bound

# Rows per group whose best score (minimum value) pass 1 keeps: the candidates are whole groups, so their
# number per query is about GROUP_ROWS x (groups near the k-th neighbour). Measured on ELPV
# lite0 banks (784 queries): the group maxima cost the same for 4 to 32 rows; fewer rows per group
# leave fewer candidates to measure. The compiled kernels are written for it.
GROUP_ROWS = search_kernels.GROUP_ROWS
# Row groups per super group: pass 1 also keeps each super group's best, so that choosing
# candidates reads a query's 20-odd super minima per block, then only the groups of the super
# groups that reach the threshold, instead of all of a block's groups (each a strided read of the
# group maxima). ELPV mono bank (24,932 x 152), 8 test images, 2 threads, bfloat16, same process:
# median search per image 24.1 ms without super groups, 19.5 ms with 16 (docs/benchmarks/search.md);
# 4 / 8 / 16 / 32 groups per super group interleaved: 14.3 / 14.1 / 13.8 / 14.0 ms.
SUPER_GROUPS = 16
# Bytes of group minima kept per query chunk (sets the queries per chunk on large banks).
GROUP_STATS_BYTES = 32 * 2**20
# Bytes of candidate bank rows gathered at once to measure their distances.
RANK_BYTES = 8 * 2**20
# Half-precision tiles whose minima are taken on their bits as int16 (see _keys), and the key of
# +inf in each (its bits as int16).
HALF_FLOATS = (torch.bfloat16, torch.float16)
INF_KEY = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
# Super-group minima per query chunk up to which the candidate test compares all of them at once
# instead of going through the blocks that pass (a gather): for small banks and few queries.
DIRECT_SUPERS = 2**19


class ExactSearch:
    """Exact k-nearest-neighbour search over a fixed ``(M, D)`` float32 bank.

    Args:
        bank: the rows searched; kept by reference (no copy).
        precision: ``auto`` (low precision where measured faster, see
            :func:`low_precision_is_faster`), ``float32``, ``bfloat16`` (CPU) or ``float16``
            (CUDA). Results are the same for all; only speed differs.
        block_rows: bank rows per product (None = :func:`default_block_rows`), rounded down to a
            multiple of ``GROUP_ROWS * SUPER_GROUPS``.
        query_rows: queries per chunk (None = as many as keep the group maxima within
            ``GROUP_STATS_BYTES``, at least 256).
        kernels: ``auto`` (``compiled`` on CPU, ``torch`` on CUDA), ``compiled`` (the numba
            kernels of :mod:`~defectlab.components.search_kernels` for pass 1's minima and, for
            k = 1, the candidates and their ranking; CPU only) or ``torch`` (torch operations
            throughout). Results are the same for all; only speed differs.
    """

    PRECISIONS = ("auto", "float32", "bfloat16", "float16")
    KERNELS = ("auto", "compiled", "torch")

    def __init__(
        self,
        bank: torch.Tensor,
        precision: str = "auto",
        block_rows: int | None = None,
        query_rows: int | None = None,
        kernels: str = "auto",
    ) -> None:
        if precision not in self.PRECISIONS:
            raise ValueError(f"precision={precision}: choose one of {self.PRECISIONS}")
        if kernels not in self.KERNELS:
            raise ValueError(f"kernels={kernels}: choose one of {self.KERNELS}")
        self.bank = bank if bank.dtype == torch.float32 else bank.float()
        self.block_rows, self.query_rows = block_rows, query_rows
        dim = self.bank.shape[1]
        device = self.bank.device
        if kernels == "compiled" and device.type != "cpu":
            raise ValueError(f"kernels=compiled runs on CPU; the bank is on {device}")
        self.compiled = kernels == "compiled" or (kernels == "auto" and device.type == "cpu")
        # Row norms in float64, a slice at a time (no float64 copy of the bank).
        norm = torch.cat([_norms64(part) for part in self._slices()])
        # float32 path: ||b||^2 / 2 as the product's bias; no copy of the bank.
        self._bias = (norm.square() / 2).float().unsqueeze(1)
        self._norm = norm
        self._maxima: dict[tuple[bool, int], torch.Tensor] = {}
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
        # int16 keys of half-precision products on CPU, else 4-byte values (_pass1)
        key_bytes = 2 if self.dtype in HALF_FLOATS and self.bank.device.type == "cpu" else 4
        most = max(256, GROUP_STATS_BYTES // (groups * key_bytes))
        # Equal chunks: 1,568 queries (two 224 px images) on the ELPV fine bank were 1,345 + 223,
        # and a small chunk pays every per-chunk cost for few queries.
        return math.ceil(queries / math.ceil(queries / most))

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
        with faithful_products():
            parts = [self._search_chunk(chunk, k) for chunk in queries.split(step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _search_chunk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._low_bank is None:
            return self._finish(queries, self._pass1_fp32(queries, k), k)
        low = self._low_queries(queries)
        fits = self._fits(low[1])
        if bool(fits.all()):
            return self._finish(queries, self._pass1_low(low, k), k)
        ids, rest = fits.nonzero()[:, 0], (~fits).nonzero()[:, 0]
        q1, r1 = self._candidates(self._pass1_low((low[0][ids], low[1][ids]), k), k)
        q2, r2 = self._candidates(self._pass1_fp32(queries[rest], k), k)
        query, rows = torch.cat([ids[q1], rest[q2]]), torch.cat([r1, r2])
        return self._rank(queries, query, rows, k)

    def _finish(self, queries: torch.Tensor, p: Pass1, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass 2 on one chunk: candidates, then their exact ranking."""
        if self.compiled and k == 1:
            limit = _value_limit(-self._thresholds(p, k)[1], p.dtype)
            rho = 2 * gamma(queries.shape[1] + 3)  # float32 distances, as in _rank
            return search_kernels.nearest(p.minima, p.supers, limit, self.bank, queries, rho)
        return self._rank(queries, *self._candidates(p, k), k)

    def _pass1(self, product, norms, bound, n: int, k: int, dtype: torch.dtype, out_unit: float):
        """Pass 1's values, reduced to group minima: see :class:`Pass1`."""
        rows = len(self.bank)
        block = self.block_rows or default_block_rows(self.bank.device, n, dtype.itemsize)
        unit = GROUP_ROWS * SUPER_GROUPS
        block = max(unit, block - block % unit)
        block = min(block, math.ceil(rows / unit) * unit)  # no tile beyond the bank
        blocks = math.ceil(rows / block)
        groups = block // GROUP_ROWS
        device = self.bank.device
        key = torch.int16 if dtype in HALF_FLOATS else dtype
        minima = torch.empty(blocks, groups, n, dtype=key, device=device)
        inf = INF_KEY.get(dtype, math.inf)
        minima[-1, math.ceil((rows - (blocks - 1) * block) / GROUP_ROWS) :] = inf  # padding groups
        supers = torch.empty(blocks, groups // SUPER_GROUPS, n, dtype=key, device=device)
        # One output tile, reused: a fresh megabyte-sized tensor per product is a fresh mapping
        # from the OS on CPU (page faults on every block). CUDA's allocator caches its own.
        tile = None if device.type == "cuda" else torch.empty(block, n, dtype=dtype, device=device)
        if self.compiled:  # handed the whole tile (one array type), it reads the first rows
            with search_kernels.tile_minima(_keys(tile), minima, supers, inf) as fill:
                for b in range(blocks):
                    start, stop = b * block, min(rows, (b + 1) * block)
                    product(start, stop, tile[: stop - start])
                    fill(b, stop - start)
        else:
            for b in range(blocks):
                start, stop = b * block, min(rows, (b + 1) * block)
                y = _keys(product(start, stop, None if tile is None else tile[: stop - start]))
                whole = (stop - start) // GROUP_ROWS * GROUP_ROWS
                _group_minima(y[:whole], minima[b, : whole // GROUP_ROWS])
                if whole < stop - start:
                    minima[b, whole // GROUP_ROWS] = y[whole:].amin(0)
                torch.amin(minima[b].view(-1, SUPER_GROUPS, n), dim=1, out=supers[b])
        # Each block's k smallest group minima, all blocks in one call (k = 1: the supers').
        if k > 1:
            top = minima.topk(min(k, groups), dim=1, largest=False).values
        else:
            top = supers.amin(1, keepdim=True)
        error = bound(self._block_maxima(norms, block))
        return Pass1(minima, supers, top, error, out_unit, dtype)

    def _block_maxima(self, norms: torch.Tensor, block: int) -> torch.Tensor:
        """:func:`_block_maxima` of the bank's (or the low bank's) norms, kept per block size.

        A property of the bank: computed on every pass it was 0.05-0.1 ms of a 1 % coreset's
        3.4 ms search per image (cProfile, ELPV mono, batch 1).
        """
        key = (norms is self._norm, block)
        if key not in self._maxima:
            self._maxima[key] = _block_maxima(norms, block)
        return self._maxima[key]

    def _low_queries(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries as the low-precision product reads them, and upper bounds of their norms."""
        n, dim = queries.shape
        x = (queries - self._centre).mul_(self._scale)  # exact scaling; centring rounds <= u32
        square = torch.linalg.vecdot(x, x).double()  # float32 sum: relative error <= gamma_D
        x_norm = (square * (1 + gamma(dim))).sqrt()
        # -x and -1 against the bank's w, h + l (~ -||w||^2 / 2) and ones: the product is
        # ||x - w||^2 / 2, the score negated exactly (same rounding, same bound), never below 0
        # but by its error; _keys relies on that.
        half = square / 2
        high = half.to(self.dtype)
        xq = torch.empty(n, dim + 4, dtype=self.dtype, device=x.device)
        xq[:, :dim] = -x
        xq[:, dim : dim + 2] = -1
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
            return low_product(self._low_bank[start:stop], xq, out)

        out_dtype = torch.float32 if xq.is_cuda else self.dtype
        out_unit = 0.0 if xq.is_cuda else UNIT[self.dtype]
        # x_norm is measured on the float32 centring of q: inflated by 2^-20 for its rounding;
        # an output below the normal range rounds by up to the output's tiny.
        x_bound = x_norm[None] * (1 + 2.0**-20)

        def bound(block_norm):
            error = low_precision_bound(x_bound, block_norm[:, None], dim, self.dtype)
            return error + TINY[out_dtype]

        return self._pass1(product, self._w_norm, bound, len(xq), k, out_dtype, out_unit)

    def _pass1_fp32(self, queries: torch.Tensor, k: int):
        q_norm = queries.double().square().sum(1).sqrt()
        dim = queries.shape[1]

        negated = -queries  # exact: the product is ||b||^2 / 2 - q . b, the score negated

        def product(start, stop, out):
            return torch.addmm(self._bias[start:stop], self.bank[start:stop], negated.T, out=out)

        def bound(block_norm):
            return fp32_bound(q_norm[None], block_norm[:, None], dim)

        return self._pass1(product, self._norm, bound, len(queries), k, torch.float32, 0.0)

    # ---- pass 2 ---------------------------------------------------------------------------

    def _thresholds(self, p: Pass1, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each block's top-k scores (float64) and the score threshold ``(blocks, n)`` of its groups.

        See :meth:`_candidates` for why a group whose best score is below it cannot hold one
        of a query's k nearest rows.
        """
        u = p.out_unit / (1 - p.out_unit)
        top64 = p.scores(p.top)
        reach = top64 - p.error[:, None]  # (blocks, k, n); padding groups are -inf
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
        need = lower[None] - p.error  # (blocks, n)
        need = need - 1e-9 * need.abs() - 1e-30
        threshold = torch.where(need >= 0, need / (1 + u), need / (1 - u))
        return top64, threshold

    def _candidates(self, p: Pass1, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query, first row)`` of every row group that can hold one of a query's k nearest.

        Every kept score y_hat (``-v`` of a kept value, :meth:`Pass1.scores`) is within
        ``error + u' |y_hat|`` of its true value (u' from the output rounding), a monotone band.
        Each block's top-k group scores (its k smallest group minima of v) belong to distinct
        rows whose true score is at least ``y_hat - u'|y_hat| - E``: the k-th largest of those,
        ``lower``, bounds the k-th best true score from below. A row can only be among the k best
        if ``y_hat + u'|y_hat| + E >= lower``; groups whose maximum fails it are out. The test
        runs on blocks, then on their super groups, then on the groups of the super groups
        that pass (a best score that fails it rules out everything under it).
        """
        top64, threshold = self._thresholds(p, k)
        n = threshold.shape[1]
        # passing super groups (block * supers + s) -> their passing groups (block * groups + g,
        # the bank's group number: its first row is GROUP_ROWS x it)
        if p.supers.numel() <= DIRECT_SUPERS:
            # Few super minima: all compared with their block's threshold at once, in the kept
            # values' own format (no float64 copy, no gathers).
            limit = _value_limit(-threshold, p.dtype)  # (blocks, n)
            b_idx, s_idx, q_idx = (p.supers <= limit[:, None]).nonzero(as_tuple=True)
            cell, threshold = b_idx * p.supers.shape[1] + s_idx, threshold[b_idx, q_idx]
        else:  # through the blocks that pass
            b_idx, q_idx = (top64[:, 0] >= threshold).nonzero(as_tuple=True)
            threshold = threshold[b_idx, q_idx]
            cell, q_idx, threshold = _passing(p.supers, b_idx, q_idx, threshold, p.scores)
        groups = p.minima.view(-1, SUPER_GROUPS, n)  # (blocks * supers, SUPER_GROUPS, n)
        group, q_idx, _ = _passing(groups, cell, q_idx, threshold, p.scores)
        return q_idx, group * GROUP_ROWS

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
        # the last group may be short: its missing rows never pass the band below
        d32 = d32.masked_fill(rows >= len(self.bank), math.inf)
        rho = 2 * gamma(dim + 3)
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


@dataclass
class Pass1:
    """What pass 1 keeps of one query chunk's values ``v`` (``-v`` is the score).

    Attributes:
        minima: each row group's minimum ``(blocks, groups, n)``, as :func:`_keys`.
        supers: each super group's minimum ``(blocks, groups / SUPER_GROUPS, n)``.
        top: each block's k smallest group minima ``(blocks, k, n)`` (k = 1: its minimum).
        error: the score error bound of each block and query ``(blocks, n)``.
        out_unit: unit roundoff of the product's output (0 when it is float32).
        dtype: the product's output dtype (the keys' meaning).
    """

    minima: torch.Tensor
    supers: torch.Tensor
    top: torch.Tensor
    error: torch.Tensor
    out_unit: float
    dtype: torch.dtype

    def scores(self, keys: torch.Tensor) -> torch.Tensor:
        """float64 scores ``-v`` of kept keys (any shape)."""
        values = keys.view(self.dtype) if keys.dtype != self.dtype else keys
        return -values.double()


def _keys(y: torch.Tensor) -> torch.Tensor:
    """Pass 1's values as the minima read them: half floats as their bits, as int16.

    torch's elementwise minimum of int16 ran 3x faster than of bfloat16 here (55 against 170 us
    for a 768 x 1345 tile; 37 against 12 GB/s). The bits of non-negative floats order as the
    floats do, and every negative one (a distance whose rounding went below 0) below all of
    them, so a minimum over keys is an element that is either the minimum or negative; a
    negative minimum is a score above 0, which passes any threshold (every threshold is at most
    0), so no group is wrongly ruled out, and each kept key is still some row's value.
    """
    return y.view(torch.int16) if y.dtype in HALF_FLOATS else y


def _value_limit(bound: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest ``dtype`` value ``<= bound`` (float64), as :func:`_keys` keeps it.

    So ``keys <= limit`` holds exactly where the kept value is at most ``bound``. For half
    floats the bound is at least 0 (the threshold on a score is at most 0, see _candidates); a
    negative kept value (key below 0) then always passes, as it does as a float.
    """
    if dtype in HALF_FLOATS:
        bound = bound.clamp_min(0)
    value = bound.to(dtype)
    below = torch.nextafter(value, torch.full((), -math.inf, dtype=dtype, device=value.device))
    return _keys(torch.where(value.double() > bound, below, value))


def _group_minima(y: torch.Tensor, out: torch.Tensor) -> None:
    """Minimum of each ``GROUP_ROWS`` consecutive rows of ``y`` into ``out``.

    Elementwise minima of strided row views. Measured on bfloat16 maxima, before the int16
    keys: 2.2x faster than ``amax`` over a ``(-1, 4, n)`` view for the 2 MB product tiles here
    (5.1 against 11.3 ms added to the products of 24,932 rows, 2 threads, loaded machine). On
    int16 keys, the whole search of 32 ELPV images on the 24,932 x 40 bank, same process: 10.0 /
    10.3 ms per image with these views against 10.9 / 10.5 with ``amin`` over the view.
    """
    torch.minimum(y[0::GROUP_ROWS], y[1::GROUP_ROWS], out=out)
    for j in range(2, GROUP_ROWS):
        torch.minimum(out, y[j::GROUP_ROWS], out=out)


def _passing(
    minima: torch.Tensor,
    cell: torch.Tensor,
    query: torch.Tensor,
    threshold: torch.Tensor,
    scores: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The entries of ``minima (cells, parts, n)`` whose score reaches each pair's threshold.

    For each ``(cell, query)`` pair, ``minima[cell, :, query]`` is read (one gather of flat
    offsets: indexing around a slice would copy all of it), turned into float64 ``scores`` and
    compared with its ``threshold``. Returns ``cell * parts + part``, the query and the threshold
    of each entry that reaches it.
    """
    parts, n = minima.shape[1], minima.shape[2]
    offsets = (cell * parts * n + query)[:, None] + n * torch.arange(parts, device=cell.device)
    values = scores(minima.reshape(-1)[offsets])  # (pairs, parts)
    pair, part = (values >= threshold[:, None]).nonzero(as_tuple=True)
    return cell[pair] * parts + part, query[pair], threshold[pair]


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
