"""PatchCore with two memory banks on two grids, their patch distances summed (``model.scales=two``).

One backbone pass per test batch feeds two :class:`PatchCore` banks (fitting embeds the training
images once per bank, as for any list of ``bank_models()``):

- *fine*: the finest configured layer alone, on its own grid (lite0 ``blocks.2``: 40-d, 28 x 28
  patches of a 224 px image);
- *coarse*: every configured layer on the deepest layer's grid (finer layers average-pooled onto
  it: 152-d, 14 x 14), a quarter of the fine queries and of its bank rows.

Each bank has its own sampler (``sampler.ratio`` of its rows) and exact search. The coarse
distances are resized bilinearly onto the fine grid and added to the fine ones: raw distances,
nothing fitted on held-out or test images. The image score is the maximum of the sum, the anomaly
map its upsampled, blurred version.

Why (``python benchmarks/patchcore_scales.py``, beside the one-bank default in one process,
2026-12-03): ELPV mono 0.9588 -> 0.9582, poly 0.9140 -> 0.9220, and every texture pixel metric up
(grass AUPRO 0.9770 -> 0.9823); the two searches took 0.64-0.92x the one-bank search's time
(docs/methods/patchcore-features.md).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components import (
    AnomalyMapGenerator,
    FeatureExtractor,
    IdentitySampler,
    NativeEmbedder,
    NearestNeighbors,
    PixelStatistics,
    Sampler,
)
from defectlab.components.embedding import Embedder
from defectlab.errors import ConfigError
from defectlab.models.patch_scoring import PatchScoring
from defectlab.models.patchcore import PatchCore

SCALES = ("auto", "one", "two")


def why_not_two_scales(
    extractor: FeatureExtractor | nn.Module, embedding: Callable[..., Embedder] | None
) -> str | None:
    """Why a two-scale PatchCore cannot be built from these settings; None when it can."""
    if not isinstance(extractor, FeatureExtractor):
        return "takes one backbone: backbone=ensemble builds one one-bank PatchCore per backbone"
    if len(extractor.channels) < 2:
        return (
            f"needs at least two backbone.layers (a fine and a deeper one), got "
            f"{len(extractor.channels)}"
        )
    # The embedding= group arrives as a Hydra partial of its class.
    base, settings = (
        (embedding.func, embedding.keywords)
        if isinstance(embedding, functools.partial)
        else (embedding or NativeEmbedder, {})
    )
    if base is not NativeEmbedder:
        return "needs embedding=native"
    if settings.get("dim") is not None or settings.get("grid_layer", 0) != 0:
        return (
            "sets each bank's grid itself: it needs embedding.dim=null and embedding.grid_layer=0"
        )
    return None


class TwoScalePatchCore(PatchScoring, nn.Module):
    """A fine and a coarse PatchCore bank sharing one backbone; image score = max of the summed map.

    Args:
        extractor: frozen backbone returning at least two layers, finest first.
        sampler: memory-bank subsampler, copied for each bank.
        knn: nearest-neighbour search, copied for each bank.
        embedding: the ``embedding=`` partial; it must build :class:`NativeEmbedder` layouts
            without ``dim`` or ``grid_layer`` (each bank sets its own layers and grid).
        blur_sigma: Gaussian sigma of the anomaly map.
        memory: as :class:`PatchCore`, for both banks.
        embed_chunk: as :class:`PatchCore`, for both banks.
        patch_neighbors: as :class:`PatchCore`, for both banks.
        pixel_statistics: per-position z-scores of the summed map against held-out good images
            (:meth:`fit_statistics`); the image score is then the z-map's maximum.
        fine_ratio: the fraction of the fine bank's patches its sampler keeps (None = the
            sampler's own ratio, as the coarse bank's). The fine bank's search is about four
            fifths of the default's: 0.05 with a 10 % coarse bank ran ELPV mono's test pass
            1.4x as fast (docs/methods/patchcore-features.md).
    """

    localizes = True

    def __init__(
        self,
        extractor: FeatureExtractor,
        sampler: Sampler,
        knn: NearestNeighbors,
        embedding: Callable[..., Embedder] | None = None,
        blur_sigma: float = 4.0,
        memory: Mapping[str, Any] | None = None,
        embed_chunk: int | None = None,
        patch_neighbors: int = 1,
        pixel_statistics: PixelStatistics | None = None,
        fine_ratio: float | None = None,
    ) -> None:
        super().__init__()
        reason = why_not_two_scales(extractor, embedding)
        if reason is not None:
            raise ConfigError(f"model.scales=two {reason}")
        samplers = {"fine": _with_ratio(sampler, fine_ratio), "coarse": copy.deepcopy(sampler)}
        layers = len(extractor.channels)
        embedding = embedding or NativeEmbedder
        self.extractor = extractor
        layouts = {
            "fine": functools.partial(embedding, layers=[0]),
            "coarse": functools.partial(embedding, grid_layer=layers - 1),
        }
        members = {}
        for name, layout in layouts.items():
            member = PatchCore(
                extractor,
                samplers[name],
                copy.deepcopy(knn),
                layout,
                k=1,  # no Eq. 7: the image score is the maximum of the summed map
                blur_sigma=blur_sigma,
                memory=memory,
                embed_chunk=embed_chunk,
                patch_neighbors=patch_neighbors,
            )
            # The backbone is this module's: held by each bank as a plain attribute, not a
            # submodule, so the model's state and model file hold it once.
            del member._modules["extractor"]
            member.__dict__["extractor"] = extractor
            members[name] = member
        self.members = nn.ModuleDict(members)
        self.anomaly_map = AnomalyMapGenerator(blur_sigma)
        self.pixel_statistics = pixel_statistics

    @property
    def fine(self) -> PatchCore:
        return self.members["fine"]

    @property
    def coarse(self) -> PatchCore:
        return self.members["coarse"]

    def bank_models(self) -> list[PatchCore]:
        """The two banks to fit, fine first."""
        return list(self.members.values())

    @property
    def input_multiple(self) -> int:
        return self.extractor.input_multiple

    @property
    def embed_batch(self) -> int | None:
        return self.fine.embed_batch

    @property
    def prepare_images(self) -> int:
        return 0  # neither layout has a fitted projection (embedding.dim is refused)

    def prepare(self, images: torch.Tensor) -> None:
        del images

    @property
    def is_fitted(self) -> bool:
        return all(m.is_fitted for m in self.members.values())

    def scored_features(self, emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The coarse patch features ``(B, h, w, D)`` (every layer) of one pass."""
        return emb[1]

    # The stages PatchScoring runs (embed -> score_patches -> anomaly_map), for one backbone pass and
    # two banks: benchmarks time them alike for both layouts.
    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine ``(B, h, w, Df)`` and coarse ``(B, h', w', Dc)`` patch features of one pass."""
        features = self.extractor(images)
        fine = self.fine.embedder(features).permute(0, 2, 3, 1)
        coarse = self.coarse.embedder(features).permute(0, 2, 3, 1)
        return fine, coarse

    @torch.no_grad()
    def score_patches(
        self, emb: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed distances on the fine grid ``(B, 1, h, w)`` and image scores (their maximum)."""
        near, _ = self.fine.score_patches(emb[0])
        far, _ = self.coarse.score_patches(emb[1])
        grid = self.combine(near, far)
        return grid, grid.flatten(1).amax(dim=1)

    @staticmethod
    def combine(near: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
        """Fine distances ``(B, 1, h, w)`` plus coarse ones ``(B, 1, h', w')`` resized onto them."""
        size = tuple(near.shape[-2:])
        return near + F.interpolate(far, size=size, mode="bilinear", align_corners=False)


def _with_ratio(sampler: Sampler, ratio: float | None) -> Sampler:
    """A copy of ``sampler`` keeping ``ratio`` of the rows (None: its own ratio)."""
    sampler = copy.deepcopy(sampler)
    if ratio is None:
        return sampler
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio <= 1:
        raise ConfigError(f"model.fine_ratio={ratio}: a fraction in (0, 1], or null")
    if isinstance(sampler, IdentitySampler):
        raise ConfigError(
            f"model.fine_ratio={ratio}: sampler=none keeps every row; use sampler=coreset or "
            "sampler=random, or model.fine_ratio=null"
        )
    sampler.ratio = float(ratio)
    return sampler
