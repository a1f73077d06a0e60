"""Nearest-neighbour search over a memory bank: exact faiss on CPU, torch on GPU, faiss IVF/HNSW."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from defectlab.errors import ConfigError

try:  # faiss is a dependency, but the torch path keeps working without it
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is missing
    faiss = None


class NearestNeighbors:
    """Euclidean k-nearest-neighbour search.

    Args:
        backend: ``faiss`` (exact flat L2 search, on the bank's own memory), ``torch`` (exact,
            chunked matrix products; used on GPU), ``auto`` (faiss for CPU tensors when
            installed, torch otherwise), or the
            approximate faiss indexes for very large banks: ``ivf`` (inverted lists: k-means
            cells, ``nprobe`` of ``nlist`` searched) and ``hnsw`` (graph, ``hnsw_m`` links per node,
            ``ef_search`` candidates per query). Approximate indexes may miss the true nearest
            neighbour, which can only raise a distance (README: measured AUROC cost).
        chunk_size: queries per block on the torch path (bounds the distance-matrix memory);
            None = one block (exported graphs: a data-dependent loop would not trace).
        nlist: ``ivf`` cells (0 = 4 * sqrt(bank size), faiss's rule of thumb).
        nprobe: ``ivf`` cells searched per query.
        hnsw_m: ``hnsw`` neighbours per node.
        ef_search: ``hnsw`` search breadth.
        pca_dim: approximate indexes only: search in the bank's top ``pca_dim`` principal
            components (0 = full dimension). Cuts the per-query work by ``D / pca_dim``; pair it
            with ``refine`` so the final pick is made on exact distances.
        refine: approximate indexes only: take ``refine * k`` candidates and keep the ``k`` with
            the smallest exact distances (faiss ``IndexRefineFlat``; 1 = off).
    """

    BACKENDS = ("auto", "faiss", "torch", "ivf", "hnsw")
    APPROXIMATE = ("ivf", "hnsw")

    def __init__(
        self,
        backend: str = "auto",
        chunk_size: int | None = 4096,
        nlist: int = 0,
        nprobe: int = 8,
        hnsw_m: int = 32,
        ef_search: int = 64,
        pca_dim: int = 0,
        refine: int = 1,
    ) -> None:
        if backend not in self.BACKENDS:
            raise ConfigError(f"model.knn.backend={backend}: choose one of {self.BACKENDS}")
        if backend in ("faiss", *self.APPROXIMATE) and faiss is None:
            raise ConfigError(
                f"model.knn.backend={backend} but faiss is not installed: pip install faiss-cpu"
            )
        for key, value, low in [
            ("nlist", nlist, 0),
            ("nprobe", nprobe, 1),
            ("hnsw_m", hnsw_m, 2),
            ("ef_search", ef_search, 1),
            ("pca_dim", pca_dim, 0),
            ("refine", refine, 1),
        ]:
            if value < low:
                raise ConfigError(f"model.knn.{key} must be >= {low}, got {value}")
        if (pca_dim or refine > 1) and backend not in self.APPROXIMATE:
            raise ConfigError(
                f"model.knn.pca_dim / refine apply to the approximate backends {self.APPROXIMATE}, "
                f"not backend={backend} (exact search needs neither)"
            )
        self.backend = backend
        self.chunk_size = chunk_size
        self.nlist, self.nprobe = nlist, nprobe
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.pca_dim, self.refine = pca_dim, refine
        self._bank: torch.Tensor | None = None
        self._index = None  # approximate faiss index
        self._flat: np.ndarray | None = None  # the bank as exact faiss search reads it

    @property
    def size(self) -> int:
        return 0 if self._bank is None else len(self._bank)

    def _use_faiss(self, device: torch.device) -> bool:
        return self.backend in ("faiss", *self.APPROXIMATE) or (
            self.backend == "auto" and faiss is not None and device.type == "cpu"
        )

    def _new_index(self, bank: np.ndarray):
        """The trained and filled approximate index (``ivf`` or ``hnsw``) over ``bank``."""
        dim = bank.shape[1]
        if self.pca_dim >= dim:
            raise ConfigError(
                f"model.knn.pca_dim={self.pca_dim} must be below the feature dimension {dim} "
                "(0 = no projection)"
            )
        inner_dim = self.pca_dim or dim
        if self.backend == "hnsw":
            index = faiss.IndexHNSWFlat(inner_dim, self.hnsw_m)
            index.hnsw.efSearch = self.ef_search
        else:  # ivf
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
        self._bank = None
        self._index, self._flat = None, None

    def ensure_fitted(self, bank: torch.Tensor) -> NearestNeighbors:
        """Index ``bank`` unless already indexed (a loaded checkpoint restores the bank, not the index)."""
        return self if self.size else self.fit(bank)

    def fit(self, bank: torch.Tensor) -> NearestNeighbors:
        """Index the ``(M, D)`` bank."""
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(
                f"memory bank must be a non-empty (M, D) tensor, got {tuple(bank.shape)}"
            )
        self._bank = bank.float()
        self._index, self._flat = None, None
        if self._use_faiss(bank.device):
            # A view of the bank when it is a contiguous CPU float32 tensor (the usual case).
            rows = self._bank.detach().cpu().contiguous().numpy()
            if self.backend in self.APPROXIMATE:
                self._index = self._new_index(rows)
            else:
                self._flat = rows
        return self

    def _faiss_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances and indices from the approximate index, or exact flat search."""
        if self._index is not None:
            return self._index.search(queries, k)
        # faiss.knn is IndexFlatL2's search run on the bank's own memory: an IndexFlatL2 would hold
        # a second copy of the bank (97 MB for ELPV mono at 10 %), for the same results.
        return faiss.knn(queries, self._flat, k)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return distances and indices, each ``(Q, k)``, of the ``k`` nearest bank rows."""
        if self._bank is None:
            raise RuntimeError("NearestNeighbors.search called before fit")
        if not 1 <= k <= self.size:
            raise ConfigError(f"k={k} must be between 1 and the memory bank size {self.size}")
        queries = queries.float()
        if self._index is not None or self._flat is not None:
            squared, idx = self._faiss_search(queries.detach().cpu().contiguous().numpy(), k)
            idx = torch.from_numpy(idx).to(queries.device)
            if self.refine > 1:  # IndexRefineFlat measures its picks directly: no cancellation
                dists = torch.from_numpy(squared).clamp_min(0).sqrt().to(queries.device)
            else:
                chunk_size = self.chunk_size or len(queries)
                bank = self._bank.to(queries.device)
                dists = torch.cat(
                    [
                        _exact_distances(q, i, bank)
                        for q, i in zip(
                            queries.split(chunk_size), idx.split(chunk_size), strict=True
                        )
                    ]
                )
            missing = (idx < 0).any(dim=1)  # an IVF probe can hold fewer than k points
            if missing.any():
                dists[missing], idx[missing] = self._exact(queries[missing], k)
            return dists, idx
        return self._exact(queries, k)

    def _exact(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked brute force in torch (GPU path, fallback, and misses of approximate indexes)."""
        bank = self._bank.to(queries.device)
        bank_sq = bank.square().sum(1)
        dists, indices = [], []
        chunks = (queries,) if self.chunk_size is None else queries.split(self.chunk_size)
        for chunk in chunks:
            d2 = torch.addmm(bank_sq.unsqueeze(0), chunk, bank.T, alpha=-2.0)
            d2 += chunk.square().sum(1, keepdim=True)
            _, i = d2.topk(k, dim=1, largest=False)
            dists.append(_exact_distances(chunk, i, bank))
            indices.append(i)
        return torch.cat(dists), torch.cat(indices)


def _exact_distances(queries: torch.Tensor, idx: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``||q - bank[idx]||`` for ``(Q, D)`` queries and their ``(Q, k)`` neighbour indices.

    The search ranks with ||q||^2 - 2 q.b + ||b||^2, which cancels badly when features are long and
    neighbours close (1e-4 relative error on ELPV with resnet18 features, and different errors in
    faiss and torch); the chosen neighbours' distances are recomputed directly, which is cheap.
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
