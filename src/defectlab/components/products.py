"""How the exact search's matrix products run here: block sizes, precision, faithful settings."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path

import torch

LOW_PRECISION = {"cpu": torch.bfloat16, "cuda": torch.float16}


@functools.cache
def cpu_cache_bytes(level: int) -> int | None:
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
    """Bank rows per product: the ``(rows, queries)`` output tile is twice the threads' L2 caches.

    Pass 1 reads each tile right after the product writes it (the group minima), while it is in
    the caches of the cores that wrote it. Measured on ELPV (25k x 152 bank, 784 queries, one
    thread): 24.4-25.8 ms per image for 0.5-2 MB tiles, 28 / 40 / 62 ms for 4 / 8 / 16 MB; this
    CPU has 1 MB of L2 per core. With two threads (ELPV fine bank 24,932 x 40, 1,568 queries,
    same process) tiles of 2 x L2 per thread searched in 12.3 ms per image against 13.8 for 1 x.
    On CUDA, tiles of up to 2^26 values amortise kernel launches.
    """
    if device.type == "cuda":
        rows = 2**26 // max(queries, 1)
    else:
        l2 = cpu_cache_bytes(2) or 2**20
        rows = 2 * l2 * torch.get_num_threads() // (max(queries, 1) * itemsize)
    rows = max(256, min(rows, 2**20 if device.type == "cuda" else 16384))
    return rows


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
        low = _time(sync(lambda: low_product(low_bank, low_query)))
    except RuntimeError:  # no kernel for this dtype here
        return False
    full = _time(sync(lambda: torch.addmm(bias, bank, query.T)))
    return low < 0.75 * full


@contextlib.contextmanager
def faithful_products():
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


def low_product(
    bank_rows: torch.Tensor, queries: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``bank_rows @ queries.T`` in low precision: float32 output on CUDA, bfloat16 on CPU."""
    if bank_rows.is_cuda:  # fp32 accumulation and output: no fp16 reduced-precision reduction
        return torch.mm(bank_rows, queries.T, out_dtype=torch.float32)
    return torch.mm(bank_rows, queries.T, out=out)
