"""PatchCore over several backbones: one member per backbone, scores averaged after normalisation.

The paper's ensembles (Roth et al., Sec. 4.4) average the members' scores after normalising each
member; its code min-max-normalises with the test set. Here every member's image scores and maps
are z-scored with statistics of the held-out *good* images only (:meth:`fit_normalization`), so
nothing is fitted on test data, and the ensemble's output is the mean of the normalised members.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from defectlab.components import BackboneEnsemble, FeatureExtractor, NearestNeighbors, Sampler
from defectlab.components.embedding import Embedder
from defectlab.errors import ConfigError
from defectlab.models.output import AnomalyOutput
from defectlab.models.patchcore import PatchCore
from defectlab.models.two_scale import SCALES, TwoScalePatchCore, why_not_two_scales

AUTO = "auto"
# model.k=auto on one bank: the paper's Eq. 7 neighbourhood (b = 9 in its code).
EQ7_K = 9


class PatchCoreEnsemble(nn.Module):
    """Member PatchCores, each z-scored on held-out good images, averaged.

    Args:
        members: name -> fitted-or-not :class:`PatchCore`, one per backbone.
    """

    localizes = True  # mean of the members' z-scored maps

    def __init__(self, members: Mapping[str, PatchCore]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ConfigError("an ensemble needs at least two members")
        self.members = nn.ModuleDict(dict(members))
        n = len(members)
        # Per member: mean / std of held-out good image scores and of their anomaly-map pixels.
        self.register_buffer("score_mean", torch.zeros(n))
        self.register_buffer("score_std", torch.ones(n))
        self.register_buffer("map_mean", torch.zeros(n))
        self.register_buffer("map_std", torch.ones(n))
        self.register_buffer("normalized", torch.zeros((), dtype=torch.bool))

    def bank_models(self) -> list[PatchCore]:
        """The memory-bank models to fit, one per backbone."""
        return list(self.members.values())

    @property
    def k(self) -> int:
        return max(m.k for m in self.members.values())

    @property
    def embed_batch(self) -> int | None:
        return next(iter(self.members.values())).embed_batch

    @property
    def input_multiple(self) -> int:
        return math.lcm(*(m.input_multiple for m in self.members.values()))

    @property
    def prepare_images(self) -> int:
        return max(m.prepare_images for m in self.members.values())

    @torch.no_grad()
    def prepare(self, images: torch.Tensor) -> None:
        for member in self.members.values():
            if member.prepare_images:
                member.prepare(images[: member.prepare_images])

    @property
    def is_fitted(self) -> bool:
        return all(m.is_fitted for m in self.members.values())

    @torch.no_grad()
    def predict_members(self, images: torch.Tensor) -> list[AnomalyOutput]:
        """Each member's raw output for images ``(B, 3, H, W)`` in [0, 1]."""
        return [m.predict(images) for m in self.members.values()]

    @torch.no_grad()
    def fit_normalization(self, batches: Iterable[torch.Tensor]) -> None:
        """Fit each member's score and map statistics on held-out good images (never test data)."""
        n = len(self.members)
        scores: list[list[torch.Tensor]] = [[] for _ in range(n)]
        # Map pixels: running float64 sums, so no (N, H, W) copy of every map is kept.
        total = torch.zeros(n, dtype=torch.float64)
        squares = torch.zeros(n, dtype=torch.float64)
        count = 0
        for images in batches:
            for i, out in enumerate(self.predict_members(images)):
                scores[i].append(out.score.double().cpu())
                amap = out.anomaly_map.double().cpu()
                total[i] += amap.sum()
                squares[i] += amap.square().sum()
            count += images.shape[0] * images.shape[-2] * images.shape[-1]
        held_out = sum(len(s) for s in scores[0])
        if held_out < 2:
            raise ConfigError(
                f"backbone=ensemble normalises its members on held-out good images and got "
                f"{held_out}: raise data.val_ratio or add training images"
            )
        member_scores = [torch.cat(s) for s in scores]
        self.score_mean.copy_(torch.stack([s.mean() for s in member_scores]))
        self.score_std.copy_(torch.stack([s.std().clamp_min(1e-12) for s in member_scores]))
        mean = total / count
        self.map_mean.copy_(mean)
        self.map_std.copy_((squares / count - mean.square()).clamp_min(1e-24).sqrt())
        self.normalized.fill_(True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Mean of the members' z-scored image scores ``(B,)`` and maps ``(B, 1, H, W)``."""
        if not bool(self.normalized):
            raise RuntimeError(
                "PatchCoreEnsemble is not normalised: fit_normalization on held-out good images first"
            )
        outs = self.predict_members(images)
        score = torch.stack(
            [(o.score - self.score_mean[i]) / self.score_std[i] for i, o in enumerate(outs)]
        ).mean(0)
        amap = torch.stack(
            [(o.anomaly_map - self.map_mean[i]) / self.map_std[i] for i, o in enumerate(outs)]
        ).mean(0)
        return AnomalyOutput(score=score, anomaly_map=amap)


def build_patchcore(
    extractor: FeatureExtractor | BackboneEnsemble,
    sampler: Sampler,
    knn: NearestNeighbors,
    embedding: Callable[..., Embedder] | None = None,
    # One bank when absent: model files and run configs written before model.scales existed
    # rebuild the one-bank model they were fitted as (even with model.k=1).
    scales: str = "one",
    **kwargs: Any,
) -> PatchCore | PatchCoreEnsemble | TwoScalePatchCore:
    """PatchCore for one backbone; a :class:`PatchCoreEnsemble` of one per ensemble member.

    ``kwargs`` are PatchCore's other arguments (``k``, ``blur_sigma``, ``memory``, ...), shared by
    the members. Each member gets its own copy of the (unfitted) sampler, search index and
    per-pixel statistics. ``scales``: ``one`` bank, ``two`` (:class:`TwoScalePatchCore`: a fine
    and a coarse bank on one backbone) or ``auto``: two where they apply (one backbone, at least
    two layers, ``embedding=native`` without ``dim`` / ``grid_layer``, ``k`` auto or 1), else
    one. ``k`` (in ``kwargs``): ``auto`` = :data:`EQ7_K` for one bank, unused by two.
    ``fine_ratio`` (in ``kwargs``): the fine bank's sampler ratio with two banks (None = the
    sampler's); refused with one bank.
    """
    if scales not in SCALES:
        raise ConfigError(f"model.scales={scales}: choose one of {SCALES}")
    k = kwargs.pop("k", AUTO)
    if k != AUTO and (isinstance(k, bool) or not isinstance(k, int)):
        raise ConfigError(f"model.k={k}: auto or a count >= 1")
    if scales == AUTO:
        applies = k in (AUTO, 1) and why_not_two_scales(extractor, embedding) is None
        scales = "two" if applies else "one"
    fine_ratio = kwargs.pop("fine_ratio", None)
    if fine_ratio is not None and scales != "two":
        raise ConfigError(
            f"model.fine_ratio={fine_ratio} sets the fine bank of two (model.scales=two), but "
            "this model has one bank per backbone: set model.fine_ratio=null (sampler.ratio "
            "sets its bank)"
        )
    if scales == "two":
        if k not in (AUTO, 1):
            raise ConfigError(
                f"model.k={k}: model.scales=two scores an image by the maximum of its summed "
                "distance map (Eq. 7 re-weights one bank's nearest row): set model.k=auto or 1, "
                "or model.scales=one"
            )
        return TwoScalePatchCore(
            extractor, sampler, knn, embedding, fine_ratio=fine_ratio, **kwargs
        )
    kwargs["k"] = EQ7_K if k == AUTO else k
    if isinstance(extractor, FeatureExtractor):
        return PatchCore(extractor, sampler, knn, embedding, **kwargs)
    members = {
        name: PatchCore(
            member,
            copy.deepcopy(sampler),
            copy.deepcopy(knn),
            embedding,
            **{**kwargs, "pixel_statistics": copy.deepcopy(kwargs.get("pixel_statistics"))},
        )
        for name, member in extractor.members.items()
    }
    return PatchCoreEnsemble(members)
