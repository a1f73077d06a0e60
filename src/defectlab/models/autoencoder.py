"""Convolutional autoencoder: anomalies are what it cannot reconstruct (Bergmann et al., VISAPP 2019)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from defectlab.components import AnomalyMapGenerator, MapScore, PixelStatistics
from defectlab.components.shapes import check_divisible
from defectlab.errors import ConfigError
from defectlab.models.output import AnomalyOutput

LOSSES = ("l2", "l2+ssim", "ssim", "ms_ssim")
MAPS = ("l2", "ssim")
# MS-SSIM over 3 scales (the first three of Wang et al.'s 5 weights, renormalised by torchmetrics):
# 5 scales need sides above 160 px with 11 px windows, 3 work from 41 px (128 px presets).
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001)


def _block(cin: int, cout: int, transpose: bool) -> nn.Sequential:
    conv = (
        nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
        if transpose
        else nn.Conv2d(cin, cout, 4, stride=2, padding=1)
    )
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))


class ConvAutoencoder(nn.Module):
    """Strided-conv encoder to a spatial bottleneck, mirrored transposed-conv decoder.

    Trained on good images only. The anomaly map is the per-pixel squared reconstruction error
    (mean over channels), Gaussian-smoothed; the image score reduces the map (``max`` or the mean
    of its ``topk`` largest pixels).

    Args:
        depth: down-sampling stages; the bottleneck is ``H / 2**depth`` pixels across.
        channels: channels of the first stage, doubled at every further stage.
        latent_dim: channels of the bottleneck (``latent_dim x H/2**depth x W/2**depth``); small
            values force the model to learn the normal appearance instead of copying pixels.
        loss: ``l2``, ``l2+ssim`` (adds ``ssim_weight * (1 - SSIM)``, sharper structure),
            ``ssim`` (``1 - SSIM`` alone, Bergmann et al. 2019) or ``ms_ssim`` (``1 - MS-SSIM``
            over 3 scales).
        ssim_weight: weight of the SSIM term of ``l2+ssim``.
        anomaly_map: ``l2`` (per-pixel squared error) or ``ssim`` (``1 - `` the local SSIM
            of 11 px Gaussian windows: structure and contrast differences, not brightness).
        grayscale: reconstruct the channel mean only (grayscale data: 1/3 of the input work,
            and no capacity spent on three identical channels).
        pixel_statistics: per-pixel z-scores of the error map against its mean and spread over
            the good training images (fitted by the training system); None = raw error.
        score: ``max`` or ``topk_mean`` reduction of the map into the image score.
        topk: pixels averaged by ``topk_mean``.
        blur_sigma: Gaussian sigma of the anomaly map (pixels); 0 disables it.
    """

    supervised = False
    synthesizes_defects = False  # models.protocols.TrainedModel: learns from good images only

    def __init__(
        self,
        depth: int = 4,
        channels: int = 32,
        latent_dim: int = 64,
        loss: str = "l2",
        ssim_weight: float = 1.0,
        anomaly_map: str = "l2",
        grayscale: bool = False,
        pixel_statistics: PixelStatistics | None = None,
        score: str = "max",
        topk: int = 100,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ConfigError(f"model.depth must be >= 1, got {depth}")
        if channels < 1 or latent_dim < 1:
            raise ConfigError(
                f"model.channels={channels} and model.latent_dim={latent_dim} must be >= 1"
            )
        if loss not in LOSSES:
            raise ConfigError(f"model.loss={loss}: choose one of {LOSSES}")
        if anomaly_map not in MAPS:
            raise ConfigError(f"model.anomaly_map={anomaly_map}: choose one of {MAPS}")
        self.depth = depth
        self.loss_name = loss
        self.ssim_weight = ssim_weight
        self.map_name = anomaly_map
        self.grayscale = grayscale
        self.pixel_statistics = pixel_statistics
        image_channels = 1 if grayscale else 3
        widths = [channels * 2**i for i in range(depth)]
        self.encoder = nn.Sequential(
            *[
                _block(cin, cout, False)
                for cin, cout in zip([image_channels, *widths[:-1]], widths, strict=True)
            ],
            nn.Conv2d(widths[-1], latent_dim, 1),
        )
        rev = widths[::-1]
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_dim, rev[0], 1),
            nn.LeakyReLU(0.2, inplace=True),
            *[_block(cin, cout, True) for cin, cout in zip(rev, [*rev[1:], rev[-1]], strict=True)],
            nn.Conv2d(rev[-1], image_channels, 3, padding=1),
            nn.Sigmoid(),  # images are in [0, 1]
        )
        self.anomaly_map = AnomalyMapGenerator(blur_sigma)
        self.map_score = MapScore(score, topk)

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this (checked from the config before any work)."""
        return 2**self.depth

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What is reconstructed: images ``(B, 3, H, W)``, or their channel mean ``(B, 1, H, W)``."""
        return images.mean(dim=1, keepdim=True) if self.grayscale else images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct :meth:`target` of images ``(B, 3, H, W)`` in [0, 1]."""
        check_divisible(images, self.depth)
        return self.decoder(self.encoder(self.target(images)))

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss of good images ``(B, 3, H, W)``."""
        recon, target = self(images), self.target(images)
        if self.loss_name == "ssim":
            return 1 - structural_similarity_index_measure(recon, target, data_range=1.0)
        if self.loss_name == "ms_ssim":
            return 1 - multiscale_structural_similarity_index_measure(
                recon, target, data_range=1.0, betas=MS_SSIM_BETAS
            )
        loss = F.mse_loss(recon, target)
        if self.loss_name == "l2+ssim":
            ssim = structural_similarity_index_measure(recon, target, data_range=1.0)
            loss = loss + self.ssim_weight * (1 - ssim)
        return loss

    def raw_map(self, images: torch.Tensor) -> torch.Tensor:
        """Per-pixel reconstruction error ``(B, 1, H, W)`` of images ``(B, 3, H, W)``."""
        recon, target = self(images), self.target(images)
        if self.map_name == "ssim":
            _, ssim = structural_similarity_index_measure(
                recon, target, data_range=1.0, reduction="none", return_full_image=True
            )
            return (1 - ssim).mean(dim=1, keepdim=True)
        return (recon - target).pow(2).mean(dim=1, keepdim=True)

    @torch.no_grad()
    def fit_statistics(self, good_images: Iterable[torch.Tensor]) -> None:
        """Refit ``pixel_statistics`` (if any) on :meth:`raw_map` of good training batches."""
        if self.pixel_statistics is None:
            return
        self.pixel_statistics.fit(self.raw_map(images) for images in good_images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, H, W)``: the smoothed error map and its reduction."""
        error = self.raw_map(images)
        if self.pixel_statistics is not None:
            error = self.pixel_statistics(error)
        amap = self.anomaly_map(error, tuple(images.shape[-2:]))
        return AnomalyOutput(score=self.map_score(amap), anomaly_map=amap)
