"""Nearest-neighbour search over a memory bank: exact blockwise search, or approximate faiss IVF."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from defectlab.components.exact_search import ExactSearch
from defectlab.errors import ConfigError

try:  # faiss is a dependency, but exact search works without it
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is missing
    faiss = None


class NearestNeighbors:
    """Euclidean k-nearest-neighbour search.

    Args:
        backend: ``exact`` (:class:`ExactSearch`: blockwise matrix products, low precision
            certified by an error bound; CPU and CUDA; the results of a float64 brute force), or
            the approximate faiss index ``ivf`` (inverted lists: k-means cells, ``nprobe`` of
            ``nlist`` searched), which may miss the true nearest neighbour; that can only raise a
            distance (docs/benchmarks/search.md: where it is faster, and its cost). ``auto``,
            ``torch`` and ``faiss`` are read as ``exact`` (runs saved before it existed). The
            ``hnsw`` graph index was removed: it was slower than exact search (40.6 against
            34.4 ms per image on the ELPV 10 % bank); :func:`defectlab.build.model_node` reads
            runs saved with it as ``exact``.
        precision: ``exact``: ``auto`` (bfloat16 on CPU / float16 on CUDA where measured faster
            than float32, once per process), ``float32``, ``bfloat16`` or ``float16``. Speed only.
        block_rows: ``exact``: bank rows per matrix product (None = sized to the L2 caches).
        query_rows: ``exact``: queries per chunk (None = sized to the bank).
        kernels: ``exact``: ``auto`` (compiled numba kernels on CPU, torch operations on CUDA),
            ``compiled`` or ``torch``. Speed only.
        nlist: ``ivf`` cells (0 = 4 * sqrt(bank size), faiss's rule of thumb).
        nprobe: ``ivf`` cells searched per query.
        pca_dim: approximate indexes only: search in the bank's top ``pca_dim`` principal
            components (0 = full dimension). Cuts the per-query work by ``D / pca_dim``; pair it
            with ``refine`` so the final pick is made on exact distances.
        refine: approximate indexes only: take ``refine * k`` candidates and keep the ``k`` with
            the smallest exact distances (faiss ``IndexRefineFlat``; 1 = off).
        traceable: search as one float32 block, a graph without data-dependent shapes
            (exported models; :func:`traceable_search`).
    """

    BACKENDS = ("exact", "ivf")
    APPROXIMATE = ("ivf",)
    LEGACY = ("auto", "torch", "faiss")  # exact, under the names of earlier runs

    def __init__(
        self,
        backend: str = "exact",
        precision: str = "auto",
        block_rows: int | None = None,
        query_rows: int | None = None,
        kernels: str = "auto",
        nlist: int = 0,
        nprobe: int = 8,
        pca_dim: int = 0,
        refine: int = 1,
        *,
        traceable: bool = False,
    ) -> None:
        if backend in self.LEGACY:
            backend = "exact"
        if backend == "hnsw":
            raise ConfigError(
                "model.knn.backend=hnsw was removed: it was slower than exact search "
                "(docs/benchmarks/search.md); use model.knn.backend=exact, or ivf for speed"
            )
        if backend not in self.BACKENDS:
            raise ConfigError(f"model.knn.backend={backend}: choose one of {self.BACKENDS}")
        if backend in self.APPROXIMATE and faiss is None:
            raise ConfigError(
                f"model.knn.backend={backend} but faiss is not installed: pip install faiss-cpu"
            )
        if precision not in ExactSearch.PRECISIONS:
            raise ConfigError(
                f"model.knn.precision={precision}: choose one of {ExactSearch.PRECISIONS}"
            )
        if kernels not in ExactSearch.KERNELS:
            raise ConfigError(f"model.knn.kernels={kernels}: choose one of {ExactSearch.KERNELS}")
        for key, value, low in [
            ("nlist", nlist, 0),
            ("nprobe", nprobe, 1),
            ("pca_dim", pca_dim, 0),
            ("refine", refine, 1),
            ("block_rows", 1 if block_rows is None else block_rows, 1),
            ("query_rows", 1 if query_rows is None else query_rows, 1),
        ]:
            if value < low:
                raise ConfigError(f"model.knn.{key} must be >= {low}, got {value}")
        if (pca_dim or refine > 1) and backend not in self.APPROXIMATE:
            raise ConfigError(
                f"model.knn.pca_dim / refine apply to the approximate backends {self.APPROXIMATE}, "
                f"not backend={backend} (exact search needs neither)"
            )
        self.backend = backend
        self.precision, self.block_rows, self.query_rows = precision, block_rows, query_rows
        self.kernels = kernels
        self.nlist, self.nprobe = nlist, nprobe
        self.pca_dim, self.refine = pca_dim, refine
        self.traceable = traceable
        self._bank: torch.Tensor | None = None
        self._exact: ExactSearch | None = None  # built on the first search (not while tracing)
        self._index = None  # approximate faiss index

    @property
    def size(self) -> int:
        return 0 if self._bank is None else len(self._bank)

    def _new_index(self, bank: np.ndarray):
        """The trained and filled approximate ``ivf`` index over ``bank``."""
        dim = bank.shape[1]
        if self.pca_dim >= dim:
            raise ConfigError(
                f"model.knn.pca_dim={self.pca_dim} must be below the feature dimension {dim} "
                "(0 = no projection)"
            )
        inner_dim = self.pca_dim or dim
        nlist = self.nlist or round(4 * math.sqrt(len(bank)))
        nlist = max(1, min(nlist, len(bank) // 39 or 1))  # faiss wants >= 39 points per cell
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(inner_dim), inner_dim, nlist)
        index.nprobe = min(self.nprobe, nlist)
        # faiss's Python wrappers keep the wrapped index alive, and train() trains the chain.
        if self.pca_dim:
            index = faiss.IndexPreTransform(faiss.PCAMatrix(dim, self.pca_dim), index)
        if self.refine > 1:
            index = faiss.IndexRefineFlat(index)
            index.k_factor = self.refine
        index.train(bank)
        index.add(bank)
        return index

    def reset(self) -> None:
        """Forget the indexed bank (e.g. after a new bank was loaded into the model)."""
        self._bank, self._exact, self._index = None, None, None

    def ensure_fitted(self, bank: torch.Tensor) -> NearestNeighbors:
        """Index ``bank`` unless already indexed (a loaded checkpoint restores the bank, not the index)."""
        return self if self.size else self.fit(bank)

    def fit(self, bank: torch.Tensor) -> NearestNeighbors:
        """Index the ``(M, D)`` bank (exact search keeps a reference to it, not a copy)."""
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(
                f"memory bank must be a non-empty (M, D) tensor, got {tuple(bank.shape)}"
            )
        self._bank = bank.float()
        self._exact, self._index = None, None
        if self.backend in self.APPROXIMATE and not self.traceable:
            self._index = self._new_index(self._bank.detach().cpu().contiguous().numpy())
        return self

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return distances and indices, each ``(Q, k)``, of the ``k`` nearest bank rows.

        Exact search returns the float64 brute force's neighbours (ties: lower bank index) and
        their distances, measured directly; exported graphs search exactly in float32.
        """
        if self._bank is None:
            raise RuntimeError("NearestNeighbors.search called before fit")
        if not 1 <= k <= self.size:
            raise ConfigError(f"k={k} must be between 1 and the memory bank size {self.size}")
        queries = queries.float()
        if self.traceable or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return traceable_search(queries, self._bank, k)
        if self._index is not None:
            return self._approximate(queries, k)
        if self._exact is None:
            self._exact = ExactSearch(
                self._bank, self.precision, self.block_rows, self.query_rows, self._kernels()
            )
        return self._exact.search(queries, k)

    def _kernels(self) -> str:
        """The configured kernels; ``compiled`` asked for on a CUDA bank is refused by name."""
        if self.kernels == "compiled" and self._bank.device.type != "cpu":
            raise ConfigError(
                "model.knn.kernels=compiled runs on CPU only; the memory bank is on "
                f"{self._bank.device}: use model.knn.kernels=auto or torch"
            )
        return self.kernels

    def _approximate(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        squared, idx = self._index.search(queries.detach().cpu().contiguous().numpy(), k)
        idx = torch.from_numpy(idx).to(queries.device)
        if self.refine > 1:  # IndexRefineFlat measures its picks directly: no cancellation
            dists = torch.from_numpy(squared).clamp_min(0).sqrt().to(queries.device)
        else:
            bank = self._bank.to(queries.device)
            dists = direct_distances(queries, idx.clamp_min(0), bank)
        missing = (idx < 0).any(dim=1)  # an IVF probe can hold fewer than k points
        if missing.any():
            if self._exact is None:
                self._exact = ExactSearch(self._bank, self.precision, kernels=self._kernels())
            dists[missing], idx[missing] = self._exact.search(queries[missing], k)
        return dists, idx


def traceable_search(
    queries: torch.Tensor, bank: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search as one float32 block: what exported graphs run (no data-dependent loop).

    Ranks with ||q||^2 - 2 q.b + ||b||^2 and measures the picks' distances directly.
    """
    bank_sq = bank.square().sum(1)
    d2 = torch.addmm(bank_sq.unsqueeze(0), queries, bank.T, alpha=-2.0)
    _, idx = d2.topk(k, dim=1, largest=False)
    return direct_distances(queries, idx, bank), idx


def direct_distances(queries: torch.Tensor, idx: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``||q - bank[idx]||`` for ``(Q, D)`` queries and their ``(Q, k)`` neighbour indices.

    Ranking by ||q||^2 - 2 q.b + ||b||^2 cancels badly when features are long and neighbours close
    (1e-4 relative error on ELPV with resnet18 features); the picks are measured directly.
    """
    return torch.linalg.vector_norm(queries.unsqueeze(1) - bank[idx], dim=-1)


def resize_bank_for_load(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    knn: NearestNeighbors,
    name: str = "memory_bank",
) -> None:
    """Give buffer ``name`` the checkpoint's shape and drop the stale index.

    Call from ``_load_from_state_dict``, so a checkpoint of any bank size loads into a fresh model.
    """
    key = prefix + name
    if key in state_dict:
        current = getattr(module, name)
        setattr(module, name, torch.empty_like(state_dict[key], device=current.device))
        knn.reset()
