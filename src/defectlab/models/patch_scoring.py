"""The scoring pipeline PatchCore's layouts share: embed -> score_patches -> anomaly_map."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from defectlab.components import AnomalyMapGenerator, PixelStatistics
from defectlab.models.output import AnomalyOutput


class PatchScoring:
    """``predict``, ``predict_embedded`` and ``fit_statistics`` from three stages.

    A subclass (:class:`PatchCore`, :class:`TwoScalePatchCore`) defines ``embed(images)`` (its
    patch features), ``score_patches(emb)`` (a distance grid ``(B, 1, h, w)`` and image scores),
    ``anomaly_map`` (an :class:`AnomalyMapGenerator`), ``pixel_statistics`` and
    :meth:`scored_features` (the features ``predict_embedded`` hands out).
    """

    anomaly_map: AnomalyMapGenerator
    pixel_statistics: PixelStatistics | None

    def embed(self, images: torch.Tensor) -> Any:
        raise NotImplementedError

    def score_patches(self, emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def scored_features(self, emb: Any) -> torch.Tensor:
        """The patch features ``(B, h, w, D)`` that :meth:`predict_embedded` returns."""
        return emb

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, H, W)`` in [0, 1]."""
        return self.predict_embedded(images)[0]

    @torch.no_grad()
    def predict_embedded(self, images: torch.Tensor) -> tuple[AnomalyOutput, torch.Tensor]:
        """:meth:`predict` and the patch features it scored (:meth:`scored_features`), one pass."""
        emb = self.embed(images)
        patch_scores, score = self.score_patches(emb)
        amap = self.anomaly_map(patch_scores, tuple(images.shape[-2:]))
        if self.pixel_statistics is not None:
            amap = self.pixel_statistics.z_scores(amap)
            score = amap.flatten(1).amax(dim=1)
        return AnomalyOutput(score=score, anomaly_map=amap), self.scored_features(emb)

    @torch.no_grad()
    def fit_statistics(self, good_images: Iterable[torch.Tensor]) -> None:
        """Fit ``pixel_statistics`` on the raw maps of held-out good images (never test data)."""
        if self.pixel_statistics is None:
            return
        self.pixel_statistics.fit(self._raw_map(images) for images in good_images)

    def _raw_map(self, images: torch.Tensor) -> torch.Tensor:
        """The smoothed patch-distance map ``(B, 1, H, W)``, before any per-pixel statistics."""
        patch_scores, _ = self.score_patches(self.embed(images))
        return self.anomaly_map(patch_scores, tuple(images.shape[-2:]))
