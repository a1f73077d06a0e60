"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from defectlab.components import (
    AnomalyMapGenerator,
    FeatureExtractor,
    NativeEmbedder,
    NearestNeighbors,
    PixelStatistics,
    Sampler,
    resize_bank_for_load,
)
from defectlab.components.bank_buffer import (
    EmbeddingBuffer,
    buffer_dtype,
    check_count,
    check_storage,
)
from defectlab.components.embedding import Embedder
from defectlab.components.sampler import num_samples
from defectlab.errors import ConfigError
from defectlab.models.patch_scoring import PatchScoring

AUTO = "auto"
# model.memory.embed_batch=auto on CPU. ELPV mono, lite0 native, 10 % bank, 2 cores: evaluate.py
# on one model file, two interleaved rounds, test pass 17.7 / 16.9 images/s with 8-image forwards,
# 20.7 / 25.6 with 2, 19.3 / 22.8 with 1, 21.5 / 22.4 with 4, 17.0 with the whole 32-image batch;
# interleaved train.py runs, 8 -> 2: fit 52.2 / 33.5 s -> 27.4 / 28.5 s, test 18.0 / 24.2 ->
# 30.3 / 29.2 images/s, same AUROC (docs/benchmarks/search.md). Smaller forwards keep a core's
# activations in cache.
CPU_EMBED_BATCH = 2


class PatchCore(PatchScoring, nn.Module):
    """Memory bank of locally aware patch features, scored by nearest-neighbour distance.

    Args:
        extractor: frozen backbone returning the configured layers.
        embedding: builds the patch-feature layout from the layers' channel counts
            (``embedding(channels=..., batch_chunk=...)``, the ``embedding=`` config group, a
            Hydra partial); None = :class:`NativeEmbedder` defaults.
        sampler: memory-bank subsampler (coreset, random or none).
        knn: nearest-neighbour search over the bank.
        k: neighbourhood size b of the image-score re-weighting (Eq. 7); 1 = plain max.
        patch_neighbors: a patch's score is its mean distance to this many nearest bank rows
            (1 = the paper's nearest distance); Eq. 7 still starts from the nearest row m*.
        blur_sigma: Gaussian sigma of the anomaly map.
        embed_chunk: images per patch-embedding pass (speed only; None = the whole batch).
        memory: how training embeddings are held while the bank is built: ``dtype`` of the
            pre-allocated buffer (float32 | float16 | bfloat16), ``embed_batch`` (images per
            forward; None = the loader's batch; ``auto``: see :attr:`embed_batch`),
            ``storage`` (``ram``, or ``disk``: raw rows in a temporary file in ``spill_dir``,
            only the coreset's projections in memory) and ``chunk_vectors`` (None = one
            coreset over all rows; N = coreset each N-row chunk).
        pixel_statistics: per-position z-scores of the anomaly map against held-out good images
            (aligned products); fitted by :meth:`fit_statistics` after the bank. The image score
            is then the z-scored map's maximum (Eq. 7 re-weights raw distances; not used).
    """

    # models.protocols.ResizableBuffers: the bank's row count comes from the saved model.
    resizable_buffers: tuple[str, ...] = ("memory_bank", "bank_neighbors")
    # models.protocols.DerivedBuffers: the neighbours follow from the bank; a file written before
    # they were stored loads, and they are found again then.
    derived_buffers: tuple[str, ...] = ("bank_neighbors",)
    localizes = True  # patch-level anomaly maps

    def __init__(
        self,
        extractor: FeatureExtractor,
        sampler: Sampler,
        knn: NearestNeighbors,
        embedding: Callable[..., Embedder] | None = None,
        k: int = 9,
        blur_sigma: float = 4.0,
        memory: Mapping[str, Any] | None = None,
        embed_chunk: int | None = None,
        pixel_statistics: PixelStatistics | None = None,
        patch_neighbors: int = 1,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"model.k must be >= 1, got {k}")
        if patch_neighbors < 1:
            raise ConfigError(f"model.patch_neighbors must be >= 1, got {patch_neighbors}")
        self.extractor = extractor
        self.embedder: Embedder = (embedding or NativeEmbedder)(
            channels=extractor.channels, batch_chunk=embed_chunk
        )
        self.sampler = sampler
        self.knn = knn
        self.k = k
        self.patch_neighbors = patch_neighbors
        self.anomaly_map = AnomalyMapGenerator(blur_sigma)
        self.pixel_statistics = pixel_statistics
        memory = dict(memory or {})
        self.buffer_dtype = buffer_dtype(memory.pop("dtype", "float32"))
        self.chunk_vectors = check_count("chunk_vectors", memory.pop("chunk_vectors", None))
        embed_batch = memory.pop("embed_batch", None)
        if isinstance(embed_batch, str) and embed_batch != AUTO:
            raise ConfigError(
                f"model.memory.embed_batch={embed_batch}: use auto, a count >= 1 or null"
            )
        self._embed_batch = (
            embed_batch if embed_batch == AUTO else check_count("embed_batch", embed_batch)
        )
        self.storage = check_storage(memory.pop("storage", "ram"))
        self.spill_dir = memory.pop("spill_dir", None)
        if memory:
            raise ConfigError(
                f"unknown model.memory keys {sorted(memory)}: "
                "valid are dtype, embed_batch, storage, spill_dir, chunk_vectors"
            )
        # Persistent so a checkpoint alone restores a fitted model; resized on load.
        self.register_buffer("memory_bank", torch.empty(0, self.embedder.out_dim))
        # N_b(m) of Eq. 7 for every bank row m, nearest first: a property of the bank, found once
        # when it is built, so a test image needs one search. Persistent, resized on load.
        self.register_buffer("bank_neighbors", torch.empty(0, k, dtype=torch.long))

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this (checked from the config before any work)."""
        return self.extractor.input_multiple

    @property
    def embed_batch(self) -> int | None:
        """Images per backbone forward, in fitting and scoring (None = the whole batch).

        ``auto``: :data:`CPU_EMBED_BATCH` on CPU, the whole batch on a GPU (where larger
        batches keep it busy; not measured here, no GPU was lent).
        """
        if self._embed_batch != AUTO:
            return self._embed_batch
        return CPU_EMBED_BATCH if self.memory_bank.device.type == "cpu" else None

    @property
    def is_fitted(self) -> bool:
        return len(self.memory_bank) > 0

    def bank_models(self) -> list[PatchCore]:
        """The memory-bank models to fit: this one (an ensemble lists its members)."""
        return [self]

    @property
    def prepare_images(self) -> int:
        """Training images :meth:`prepare` needs before embeddings can stream (0 = none)."""
        return self.embedder.fit_images if isinstance(self.embedder, NativeEmbedder) else 0

    @torch.no_grad()
    def prepare(self, images: torch.Tensor) -> None:
        """Fit what the embedding needs from training images ``(B, 3, H, W)`` (its projection)."""
        if isinstance(self.embedder, NativeEmbedder) and self.embedder.needs_fit:
            feats = [self.extractor(part) for part in images.split(self.embed_batch or len(images))]
            self.embedder.fit([torch.cat(layer) for layer in zip(*feats, strict=True)])

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, h, w, D)`` of images ``(B, 3, H, W)`` in [0, 1]."""
        return self.embedder(self.extractor(images)).permute(0, 2, 3, 1)

    def embedding_buffer(
        self, total: int, dim: int, device: torch.device | str = "cpu"
    ) -> EmbeddingBuffer:
        """The buffer training embeddings stream into (``model.memory`` settings)."""
        return EmbeddingBuffer(
            total,
            dim,
            dtype=self.buffer_dtype,
            chunk=self.chunk_vectors,
            reduce=self.subsample,
            device=device,
            # A chunk is bounded memory by itself: it is kept in memory whatever ``storage`` says.
            storage="ram" if self.chunk_vectors else self.storage,
            project=self.sampler.project,
            spill_dir=self.spill_dir,
        )

    def bank_rows(self, vectors: int) -> int:
        """Bank rows the sampler keeps of ``vectors`` training rows (per chunk when chunked)."""
        ratio, chunk = self.sampler.ratio, self.chunk_vectors
        if chunk:
            return sum(
                num_samples(min(chunk, vectors - s), ratio) for s in range(0, vectors, chunk)
            )
        return num_samples(vectors, ratio)

    def neighbor_settings(self) -> dict[str, int]:
        """Eq. 7's ``k`` and ``patch_neighbors``: each needs that many bank rows."""
        return {"k": self.k, "patch_neighbors": self.patch_neighbors}

    @torch.no_grad()
    def fit_buffer(self, buffer: EmbeddingBuffer) -> None:
        """Build the memory bank from a filled :meth:`embedding_buffer`."""
        if not buffer.seen:
            raise ValueError("PatchCore got no embeddings: is the training set empty?")
        if buffer.storage == "disk":
            self.fit(buffer.gather(self.sampler.select(buffer.projections())), subsample=False)
        elif buffer.chunked:
            self.fit(buffer.finish(), subsample=False)
        else:
            self.fit(buffer.finish())

    @torch.no_grad()
    def subsample(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The sampler's rows of ``(N, D)`` patch features, as float32."""
        return embeddings[self.sampler(embeddings).to(embeddings.device)].float()

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, subsample: bool = True) -> None:
        """Build the memory bank from ``(N, D)`` training patch features.

        ``subsample=False``: the rows were already subsampled (chunked coreset) and are kept as is.
        """
        if len(embeddings) == 0:
            raise ValueError("PatchCore.fit got no embeddings: is the training set empty?")
        rows = self.subsample(embeddings) if subsample else embeddings.float()
        self.memory_bank = rows.to(self.memory_bank.device)
        self.knn.fit(self.memory_bank)
        self.bank_neighbors = self._bank_neighbors()

    def _bank_neighbors(self) -> torch.Tensor:
        """``(M, k)`` indices of each bank row's k nearest bank rows (itself first, up to ties)."""
        if self.k == 1:  # N_1(m) = {m}: Eq. 7 is then not evaluated
            return torch.arange(len(self.memory_bank), device=self.memory_bank.device)[:, None]
        return self._index().search(self.memory_bank, k=self.k)[1]  # k > M: a ConfigError

    def _index(self) -> NearestNeighbors:
        if not self.is_fitted:
            raise RuntimeError(
                "PatchCore has an empty memory bank: fit it or load a checkpoint first"
            )
        return self.knn.ensure_fitted(self.memory_bank)

    @torch.no_grad()
    def score_patches(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-neighbour stage: patch scores ``(B, 1, h, w)`` and image scores ``(B,)``."""
        b, h, w, d = emb.shape
        flat = emb.reshape(-1, d)
        dist, nn_idx = self._index().search(flat, k=self.patch_neighbors)
        patch_scores = dist.mean(dim=1).view(b, h * w)  # one column: its values exactly
        score = self.image_score(patch_scores, nn_idx[:, 0].view(b, h * w), flat.view(b, h * w, d))
        return patch_scores.view(b, 1, h, w), score

    def image_score(
        self, patch_scores: torch.Tensor, nn_idx: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        """Image score from patch scores ``(B, L)``, their bank neighbours and features ``(B, L, D)``.

        Eq. 7: s = (1 - exp||m_test,* - m*|| / sum_{m in N_b(m*)} exp||m_test,* - m||) * s*,
        where m_test,* is the most anomalous test patch, s* its distance to its nearest bank
        element m*, and N_b(m*) the b = k nearest bank elements of m* (m* itself included).
        """
        # gather, not arange-indexing: the batch size stays symbolic in exported graphs.
        s_star, p_star = patch_scores.max(dim=1)
        if self.k == 1:
            return s_star
        support = self.bank_neighbors[nn_idx.gather(1, p_star[:, None])[:, 0]]  # N_b(m*), (B, k)
        dim = patches.shape[-1]
        m_test = patches.gather(1, p_star[:, None, None].expand(-1, 1, dim))  # (B, 1, D)
        d = torch.linalg.vector_norm(m_test - self.memory_bank[support], dim=-1)
        weight = 1.0 - torch.exp(s_star - torch.logsumexp(d, dim=1))
        return weight * s_star

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        for name in self.resizable_buffers:
            resize_bank_for_load(self, state_dict, prefix, self.knn, name)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        key = prefix + "bank_neighbors"
        stale = self.bank_neighbors.shape != (len(self.memory_bank), self.k)
        if self.is_fitted and (key not in state_dict or stale):
            # Saved before the neighbours were stored (an older model file, an old checkpoint
            # being converted), or a state dict of another model.k: found again.
            if key in missing_keys:
                missing_keys.remove(key)
            self.bank_neighbors = self._bank_neighbors()
