"""Compiled CPU kernels of the exact search: group minima of a product tile, and k = 1 ranking.

:class:`~defectlab.components.exact_search.ExactSearch` does the same work with torch
operations on any device; on CPU these numba kernels do it in fewer passes over memory and
without index tensors. Measured on the ELPV mono banks of the default (24,932 x 40 and
6,233 x 152, 784 queries per image, 2 threads, results identical; docs/benchmarks/search.md):

- :func:`tile_minima`: the minima of each group of 4 rows and of each super group in one read of
  the tile, against three elementwise minima and an ``amin`` that each re-read it (a 2,624 x 784
  tile alone: 48-58 against 99-114 us; inside the search, where the tile comes from the
  product, both take about 2 ms per image on the fine bank);
- :func:`nearest`: the candidate groups of each query, their float32 distances, the float64
  check of those too close to order and the pick, per query range on each thread (inside the
  search: 1.4-2.0 against 2.8-3.9 ms per image on the fine bank, one process per kind).

Both run on numba's thread pool (here the OpenMP runtime torch uses), as wide as torch's and
leaving torch's thread count as it was, one call at a time: numba's fallback pool, where OpenMP
is missing, aborts on concurrent calls, and the inspection app searches from several threads.
Compiled on first use and cached on disk (``cache=True``: about 5 s once per key type, 0.4 s to
load).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import numba
import numpy as np
import torch

# Rows per group: the minima kernel reads 4 rows per output row (ExactSearch.GROUP_ROWS uses it).
GROUP_ROWS = 4
_ONE_CALL = threading.Lock()


@contextlib.contextmanager
def _numba_pool() -> Iterator[int]:
    """One kernel call at a time, on as many numba threads as torch uses (yields the count).

    numba's OpenMP pool starts by setting the process's OpenMP thread count to all cores, which
    is torch's count too (measured: ``torch.set_num_threads(1)``, one search, then
    ``torch.get_num_threads()`` was 2): torch's own setting is put back after each call.
    """
    with _ONE_CALL:
        threads = torch.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            yield numba.get_num_threads()
        finally:
            _restore_torch_threads(threads)


def _restore_torch_threads(threads: int) -> None:
    """Put torch's thread count back to ``threads`` if numba's pool start changed it."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def tile_minima(
    tile: torch.Tensor, minima: torch.Tensor, supers: torch.Tensor, inf: float
) -> Iterator[Callable[[int, int], None]]:
    """A pass over product tiles: ``fill(b, rows)`` fills block b's minima from a key tile.

    ``fill(b, rows)`` writes ``minima[b] (groups, n)`` and ``supers[b]`` from the first ``rows``
    rows of ``tile``, which the caller refills between calls. Keys are int16 (half-float bits) or
    float32; groups past ``rows`` get ``inf`` (in the keys' format: the bits of +inf for half
    floats). CPU tensors, written in place.

    The pool is taken once for the whole pass and the arrays converted once: per call, taking it
    and converting cost 15-50 us against 50-60 us for a 640 x 784 float32 tile's minima, and the
    default's 10 % ELPV banks take 42 tiles per 224 px image. torch's thread count is put back
    after each call, so the products in between run as set.
    """
    y, keys, tops = tile.numpy(), minima.numpy(), supers.numpy()
    value = keys.dtype.type(inf)
    threads = torch.get_num_threads()  # before the pool: its start may change it

    def fill(block: int, rows: int) -> None:
        _tile_minima(y, rows, keys[block], tops[block], value)
        _restore_torch_threads(threads)

    with _numba_pool():
        _restore_torch_threads(threads)  # before the first tile's product
        yield fill


def nearest(
    minima: torch.Tensor,
    supers: torch.Tensor,
    limit: torch.Tensor,
    bank: torch.Tensor,
    queries: torch.Tensor,
    rho: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances ``(n, 1)`` and indices ``(n, 1)`` of each query's nearest row: see :func:`_nearest`."""
    with _numba_pool() as threads:
        dist, index = _nearest(
            minima.numpy(), supers.numpy(), limit.numpy(), bank.numpy(),
            queries.contiguous().numpy(), rho, threads,
        )  # fmt: skip
    return torch.from_numpy(dist)[:, None], torch.from_numpy(index)[:, None]


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _tile_minima(y, rows, minima, supers, inf):  # pragma: no cover - compiled
    """Minimum of each 4-row group of ``y[:rows]`` into ``minima`` and of each super group.

    ``y`` is a ``(block, n)`` tile of keys (int16 bits of half floats, or float32), ``minima``
    ``(groups, n)`` and ``supers`` ``(supers, n)`` with ``groups = supers x`` a whole number of
    groups per super group. Groups past ``rows`` get ``inf`` (never a candidate).
    """
    groups, n = minima.shape
    per_super = groups // supers.shape[0]
    for s in numba.prange(supers.shape[0]):
        best = supers[s]
        for q in range(n):
            best[q] = inf
        for g in range(s * per_super, (s + 1) * per_super):
            first = GROUP_ROWS * g
            out = minima[g]
            if first + GROUP_ROWS <= rows:
                a, b, c, d = y[first], y[first + 1], y[first + 2], y[first + 3]
                for q in range(n):
                    value = min(min(a[q], b[q]), min(c[q], d[q]))
                    out[q] = value
                    best[q] = min(best[q], value)
            else:  # the bank's last, short group, or padding
                for q in range(n):
                    out[q] = inf
                for r in range(first, min(first + GROUP_ROWS, rows)):
                    row = y[r]
                    for q in range(n):
                        out[q] = min(out[q], row[q])
                for q in range(n):
                    best[q] = min(best[q], out[q])


@numba.njit(cache=True, boundscheck=False)
def _passing_groups(minima, supers, limit, q0, q1):  # pragma: no cover - compiled
    """``(query, bank group)`` of every group of queries ``q0:q1`` whose key is <= the limit."""
    blocks, groups = minima.shape[:2]
    per_super = groups // supers.shape[1]
    passing = 0  # passing super groups bound the passing groups: one vectorised count first
    for b in range(blocks):
        for s in range(supers.shape[1]):
            for q in range(q0, q1):
                passing += supers[b, s, q] <= limit[b, q]
    query = np.empty(passing * per_super, np.int64)
    group = np.empty(passing * per_super, np.int64)
    count = 0
    for b in range(blocks):
        bound = limit[b]
        for s in range(supers.shape[1]):
            best = supers[b, s]
            for q in range(q0, q1):
                if best[q] <= bound[q]:
                    for g in range(s * per_super, (s + 1) * per_super):
                        if minima[b, g, q] <= bound[q]:
                            query[count] = q
                            group[count] = b * groups + g
                            count += 1
    return query[:count], group[:count]


@numba.njit(cache=True, boundscheck=False)
def _nearest_range(
    minima, supers, limit, bank, queries, rho, q0, q1, dist, index
):  # pragma: no cover
    rows, dim = bank.shape
    query, group = _passing_groups(minima, supers, limit, q0, q1)
    d32 = np.full(len(query) * GROUP_ROWS, np.inf, np.float32)
    kth = np.full(q1 - q0, np.inf, np.float32)
    for i in range(len(query)):  # float32 ||q - b||^2, each difference, square and sum rounded
        q = query[i]
        first = group[i] * GROUP_ROWS
        for r in range(first, min(first + GROUP_ROWS, rows)):
            total = np.float32(0.0)
            for j in range(dim):
                diff = bank[r, j] - queries[q, j]
                total += diff * diff
            d32[GROUP_ROWS * i + r - first] = total
            kth[q - q0] = min(kth[q - q0], total)
    best = np.full(q1 - q0, np.inf)
    pick = np.full(q1 - q0, rows, np.int64)
    for i in range(len(query)):  # float64 for every candidate float32 cannot tell from the best
        q = query[i]
        first = group[i] * GROUP_ROWS
        for r in range(first, min(first + GROUP_ROWS, rows)):
            if d32[GROUP_ROWS * i + r - first] * (1 - rho) <= kth[q - q0] * (1 + rho):
                total = 0.0
                for j in range(dim):
                    diff = np.float64(bank[r, j]) - np.float64(queries[q, j])
                    total += diff * diff
                if total < best[q - q0] or (total == best[q - q0] and r < pick[q - q0]):
                    best[q - q0] = total
                    pick[q - q0] = r
    for q in range(q0, q1):
        dist[q] = np.float32(math.sqrt(best[q - q0]))
        index[q] = pick[q - q0]


@numba.njit(parallel=True, cache=True)
def _nearest(minima, supers, limit, bank, queries, rho, parts):  # pragma: no cover - compiled
    """Distance and index of each query's nearest bank row among its candidate groups.

    ``minima (blocks, groups, n)`` and ``supers (blocks, supers, n)`` are pass 1's keys,
    ``limit (blocks, n)`` the largest key that can still hold a query's nearest row in each
    block; ``bank (M, D)`` and ``queries (n, D)`` float32. Distances are measured in float32
    (relative error <= ``rho``), those within that error of the smallest again in float64; the
    smallest float64 distance wins, ties to the lower row. ``parts`` query ranges run in
    parallel.
    """
    n = minima.shape[2]
    dist = np.empty(n, np.float32)
    index = np.empty(n, np.int64)
    step = (n + parts - 1) // parts
    for p in numba.prange(parts):
        q0, q1 = p * step, min(n, (p + 1) * step)
        if q0 < q1:
            _nearest_range(minima, supers, limit, bank, queries, rho, q0, q1, dist, index)
    return dist, index
