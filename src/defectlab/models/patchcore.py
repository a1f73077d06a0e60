"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)."""

from __future__ import annotations

import torch
from torch import nn

from defectlab.components import (
    AnomalyMapGenerator,
    FeatureExtractor,
    NearestNeighbors,
    PatchEmbedder,
    Sampler,
    resize_bank_for_load,
)
from defectlab.errors import ConfigError
from defectlab.models.output import AnomalyOutput


class PatchCore(nn.Module):
    """Memory bank of locally aware patch features, scored by nearest-neighbour distance.

    Args:
        extractor: frozen backbone returning the configured layers.
        sampler: memory-bank subsampler (coreset, random or none).
        knn: nearest-neighbour search over the bank.
        k: neighbourhood size b of the image-score re-weighting (Eq. 7); 1 = plain max.
        pretrain_embed_dim: per-layer pooled dimension.
        target_embed_dim: patch-feature dimension D.
        patch_size: local neighbourhood p.
        blur_sigma: Gaussian sigma of the anomaly map.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        sampler: Sampler,
        knn: NearestNeighbors,
        k: int = 9,
        pretrain_embed_dim: int = 1024,
        target_embed_dim: int = 1024,
        patch_size: int = 3,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"model.k must be >= 1, got {k}")
        self.extractor = extractor
        self.embedder = PatchEmbedder(
            extractor.channels, pretrain_embed_dim, target_embed_dim, patch_size
        )
        self.sampler = sampler
        self.knn = knn
        self.k = k
        self.anomaly_map = AnomalyMapGenerator(blur_sigma)
        # Persistent so a checkpoint alone restores a fitted model; resized on load.
        self.register_buffer("memory_bank", torch.empty(0, target_embed_dim))

    @property
    def is_fitted(self) -> bool:
        return len(self.memory_bank) > 0

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, h, w, D)`` of images ``(B, 3, H, W)`` in [0, 1]."""
        return self.embedder(self.extractor(images)).permute(0, 2, 3, 1)

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        """Subsample ``(N, D)`` training patch features into the memory bank."""
        if len(embeddings) == 0:
            raise ValueError("PatchCore.fit got no embeddings: is the training set empty?")
        indices = self.sampler(embeddings)
        self.memory_bank = (
            embeddings[indices.to(embeddings.device)].to(self.memory_bank.device).float()
        )
        self.knn.fit(self.memory_bank)

    def _index(self) -> NearestNeighbors:
        if not self.is_fitted:
            raise RuntimeError(
                "PatchCore has an empty memory bank: fit it or load a checkpoint first"
            )
        return self.knn.ensure_fitted(self.memory_bank)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, H, W)`` in [0, 1]."""
        patch_scores, score = self.score_patches(self.embed(images))
        amap = self.anomaly_map(patch_scores, tuple(images.shape[-2:]))
        return AnomalyOutput(score=score, anomaly_map=amap)

    @torch.no_grad()
    def score_patches(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-neighbour stage: patch scores ``(B, 1, h, w)`` and image scores ``(B,)``."""
        b, h, w, d = emb.shape
        flat = emb.reshape(-1, d)
        dist, nn_idx = self._index().search(flat, k=1)
        patch_scores = dist.view(b, h * w)
        score = self.image_score(patch_scores, nn_idx.view(b, h * w), flat.view(b, h * w, d))
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
        k = min(self.k, len(self.memory_bank))
        m_star = self.memory_bank[nn_idx.gather(1, p_star[:, None])[:, 0]]  # (B, D)
        _, support = self._index().search(m_star, k=k)  # N_b(m*), (B, k)
        dim = patches.shape[-1]
        m_test = patches.gather(1, p_star[:, None, None].expand(-1, 1, dim))  # (B, 1, D)
        d = torch.linalg.vector_norm(m_test - self.memory_bank[support], dim=-1)
        weight = 1.0 - torch.exp(s_star - torch.logsumexp(d, dim=1))
        return weight * s_star

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_bank_for_load(self, state_dict, prefix, self.knn)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
