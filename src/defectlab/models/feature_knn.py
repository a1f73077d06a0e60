"""Image-level baseline: global backbone embedding + mean distance to the k nearest train images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components import (
    EmbeddingBuffer,
    FeatureExtractor,
    NearestNeighbors,
    resize_bank_for_load,
)
from defectlab.errors import ConfigError
from defectlab.models.output import AnomalyOutput

POOLINGS = ("avg", "max", "cls")


class FeatureKNN(nn.Module):
    """Score = mean L2 distance of an image's global embedding to its ``k`` nearest train embeddings.

    The embedding concatenates each configured backbone layer, globally pooled (``avg`` or
    ``max``); for a ViT, ``avg`` is the mean patch token and ``cls`` the class token. The score is image-level
    only: ``localizes = False`` tells the system that pixel metrics do not apply, and the anomaly
    map is flat (the score everywhere).

    Args:
        extractor: frozen backbone returning the configured layers.
        knn: nearest-neighbour search over the train embeddings.
        k: neighbours averaged into the score.
        pooling: ``avg`` or ``max`` global pooling per layer, or ``cls`` (ViT class token).
        standardize: z-score every feature with the train embeddings' mean and std before search.
    """

    localizes = False
    embed_batch: int | None = None  # one image vector each: the whole batch per forward
    # models.protocols.ResizableBuffers: the bank's row count comes from the saved model.
    resizable_buffers: tuple[str, ...] = ("memory_bank",)

    def __init__(
        self,
        extractor: FeatureExtractor,
        knn: NearestNeighbors,
        k: int = 5,
        pooling: str = "avg",
        standardize: bool = False,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ConfigError(f"model.k must be >= 1, got {k}")
        if not isinstance(extractor, FeatureExtractor):
            raise ConfigError(
                f"model=feature_knn takes one backbone, got {type(extractor).__name__}: "
                "backbone=ensemble applies to model=patchcore"
            )
        if pooling not in POOLINGS:
            raise ConfigError(f"model.pooling={pooling}: choose one of {POOLINGS}")
        if pooling == "cls" and not extractor.has_class_token:
            raise ConfigError(
                f"model.pooling=cls needs a ViT backbone with a CLS token; {extractor.alias} "
                "has none (use model.pooling=avg|max)"
            )
        self.extractor = extractor
        self.knn = knn
        self.k = k
        self.pooling = pooling
        self.standardize = standardize
        dim = sum(extractor.channels)
        # Persistent so a checkpoint alone restores a fitted model; the bank is resized on load.
        self.register_buffer("memory_bank", torch.empty(0, dim))
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this (checked from the config before any work)."""
        return self.extractor.input_multiple

    prepare_images = 0  # nothing to fit before the image vectors stream in

    def bank_models(self) -> list[FeatureKNN]:
        """The memory-bank models to fit: this one."""
        return [self]

    def prepare(self, images: torch.Tensor) -> None:
        """Nothing to prepare (the memory-bank contract shared with PatchCore)."""

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Global embeddings ``(B, D)`` of images ``(B, 3, H, W)`` in [0, 1] (not standardised)."""
        if self.pooling == "cls":
            return torch.cat(self.extractor.class_tokens(images), dim=1)
        pool = F.adaptive_avg_pool2d if self.pooling == "avg" else F.adaptive_max_pool2d
        return torch.cat([pool(f, 1).flatten(1) for f in self.extractor(images)], dim=1)

    def embedding_buffer(
        self, total: int, dim: int, device: torch.device | str = "cpu"
    ) -> EmbeddingBuffer:
        """The buffer the training images' vectors stream into (float32, in memory)."""
        return EmbeddingBuffer(total, dim, device=device)

    def fit_buffer(self, buffer: EmbeddingBuffer) -> None:
        """Store every vector of a filled :meth:`embedding_buffer`."""
        self.fit(buffer.finish())

    def bank_rows(self, vectors: int) -> int:
        """Bank rows after fitting on ``vectors`` training vectors: all of them."""
        return vectors

    def neighbor_settings(self) -> dict[str, int]:
        """``k`` training images enter each score: the bank needs that many rows."""
        return {"k": self.k}

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        """Store the ``(N, D)`` train embeddings (standardised if configured) and index them."""
        if len(embeddings) == 0:
            raise ValueError("FeatureKNN.fit got no embeddings: is the training set empty?")
        embeddings = embeddings.float()
        if self.standardize:
            self.feature_mean = embeddings.mean(0)
            # A constant feature carries no information; unit std keeps it finite.
            std = embeddings.std(0) if len(embeddings) > 1 else torch.ones_like(self.feature_mean)
            self.feature_std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.memory_bank = self._standardized(embeddings).to(self.memory_bank.device)
        self.knn.fit(self.memory_bank)

    def _standardized(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings.float() - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, H, W)``; the anomaly map ``(B, 1, H, W)`` is flat."""
        if len(self.memory_bank) == 0:
            raise RuntimeError("FeatureKNN has no train embeddings: fit it or load a checkpoint")
        queries = self._standardized(self.embed(images))
        dist, _ = self.knn.ensure_fitted(self.memory_bank).search(queries, k=self.k)
        score = dist.mean(dim=1)
        flat = score.view(-1, 1, 1, 1).expand(-1, 1, *images.shape[-2:])
        return AnomalyOutput(score=score, anomaly_map=flat.contiguous())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.resizable_buffers:
            resize_bank_for_load(self, state_dict, prefix, self.knn, name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
