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

    @property
    def embed_batch(self) -> int | None:
        """Images per backbone forward (None = the whole batch)."""
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> Any:
        raise NotImplementedError

    def embed_in_slices(self, images: torch.Tensor) -> Any:
        """:meth:`embed` over slices of :attr:`embed_batch` images, concatenated.

        The backbone runs on a few images at a time (its activations stay in cache) while the
        search gets the whole batch: one search of 32 ELPV images instead of 16 of two ran the
        fine bank's queries in 10.3 instead of 15.3 ms per image (2 threads, same process).
        """
        step = self.embed_batch
        # Exported graphs keep the batch size symbolic: neither a test of it nor a loop over it
        # would trace (as components.embedding._in_chunks).
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if tracing or not step or len(images) <= step:
            return self.embed(images)
        parts = [self.embed(part) for part in images.split(step)]
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts)
        return tuple(torch.cat(layout) for layout in zip(*parts, strict=True))

    def score_patches(self, emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def scored_features(self, emb: Any) -> torch.Tensor:
        """The patch features ``(B, h, w, D)`` that :meth:`predict_embedded` returns."""
        return emb

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, H, W)`` in [0, 1] (backbone in slices of :attr:`embed_batch`)."""
        return self.predict_embedded(images)[0]

    @torch.no_grad()
    def predict_embedded(self, images: torch.Tensor) -> tuple[AnomalyOutput, torch.Tensor]:
        """:meth:`predict` and the patch features it scored (:meth:`scored_features`), one pass."""
        emb = self.embed_in_slices(images)
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
        patch_scores, _ = self.score_patches(self.embed_in_slices(images))
        return self.anomaly_map(patch_scores, tuple(images.shape[-2:]))
