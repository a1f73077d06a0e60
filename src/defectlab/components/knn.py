"""Exact nearest-neighbour search over a memory bank: faiss on CPU, torch on GPU or as fallback."""

from __future__ import annotations

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
        backend: ``faiss`` (exact flat L2 index), ``torch`` (chunked matrix products; used on GPU)
            or ``auto`` (faiss for CPU tensors when installed, torch otherwise).
        chunk_size: queries per block on the torch path (bounds the distance-matrix memory);
            None = one block (exported graphs: a data-dependent loop would not trace).
    """

    BACKENDS = ("auto", "faiss", "torch")

    def __init__(self, backend: str = "auto", chunk_size: int | None = 4096) -> None:
        if backend not in self.BACKENDS:
            raise ConfigError(f"model.knn.backend={backend}: choose one of {self.BACKENDS}")
        if backend == "faiss" and faiss is None:
            raise ConfigError(
                "model.knn.backend=faiss but faiss is not installed: pip install faiss-cpu"
            )
        self.backend = backend
        self.chunk_size = chunk_size
        self._bank: torch.Tensor | None = None
        self._index = None

    @property
    def size(self) -> int:
        return 0 if self._bank is None else len(self._bank)

    def _use_faiss(self, device: torch.device) -> bool:
        return self.backend == "faiss" or (
            self.backend == "auto" and faiss is not None and device.type == "cpu"
        )

    def reset(self) -> None:
        """Forget the indexed bank (e.g. after a new bank was loaded into the model)."""
        self._bank = None
        self._index = None

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
        self._index = None
        if self._use_faiss(bank.device):
            self._index = faiss.IndexFlatL2(bank.shape[1])
            self._index.add(self._bank.detach().cpu().contiguous().numpy())
        return self

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return distances and indices, each ``(Q, k)``, of the ``k`` nearest bank rows."""
        if self._bank is None:
            raise RuntimeError("NearestNeighbors.search called before fit")
        if not 1 <= k <= self.size:
            raise ConfigError(f"k={k} must be between 1 and the memory bank size {self.size}")
        queries = queries.float()
        if self._index is not None:
            chunk_size = self.chunk_size or len(queries)
            _, idx = self._index.search(queries.detach().cpu().contiguous().numpy(), k)
            idx = torch.from_numpy(idx).to(queries.device)
            bank = self._bank.to(queries.device)
            dists = [
                _exact_distances(q, i, bank)
                for q, i in zip(queries.split(chunk_size), idx.split(chunk_size), strict=True)
            ]
            return torch.cat(dists), idx
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
