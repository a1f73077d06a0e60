"""Convolutional autoencoder: anomalies are what it cannot reconstruct (Bergmann et al., VISAPP 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from defectlab.components import AnomalyMapGenerator, MapScore
from defectlab.components.shapes import check_divisible
from defectlab.errors import ConfigError
from defectlab.models.output import AnomalyOutput

LOSSES = ("l2", "l2+ssim")


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
        loss: ``l2`` or ``l2+ssim`` (adds ``ssim_weight * (1 - SSIM)``, sharper structure).
        ssim_weight: weight of the SSIM term.
        score: ``max`` or ``topk_mean`` reduction of the map into the image score.
        topk: pixels averaged by ``topk_mean``.
        blur_sigma: Gaussian sigma of the anomaly map (pixels); 0 disables it.
    """

    supervised = False

    def __init__(
        self,
        depth: int = 4,
        channels: int = 32,
        latent_dim: int = 64,
        loss: str = "l2",
        ssim_weight: float = 1.0,
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
        self.depth = depth
        self.loss_name = loss
        self.ssim_weight = ssim_weight
        widths = [channels * 2**i for i in range(depth)]
        self.encoder = nn.Sequential(
            *[
                _block(cin, cout, False)
                for cin, cout in zip([3, *widths[:-1]], widths, strict=True)
            ],
            nn.Conv2d(widths[-1], latent_dim, 1),
        )
        rev = widths[::-1]
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_dim, rev[0], 1),
            nn.LeakyReLU(0.2, inplace=True),
            *[_block(cin, cout, True) for cin, cout in zip(rev, [*rev[1:], rev[-1]], strict=True)],
            nn.Conv2d(rev[-1], 3, 3, padding=1),
            nn.Sigmoid(),  # images are in [0, 1]
        )
        self.anomaly_map = AnomalyMapGenerator(blur_sigma)
        self.map_score = MapScore(score, topk)

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this (checked from the config before any work)."""
        return 2**self.depth

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruct images ``(B, 3, H, W)`` in [0, 1]."""
        check_divisible(images, self.depth)
        return self.decoder(self.encoder(images))

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss of good images ``(B, 3, H, W)``."""
        recon = self(images)
        loss = F.mse_loss(recon, images)
        if self.loss_name == "l2+ssim":
            ssim = structural_similarity_index_measure(recon, images, data_range=1.0)
            loss = loss + self.ssim_weight * (1 - ssim)
        return loss

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, H, W)``: smoothed per-pixel squared error and its reduction."""
        error = (self(images) - images).pow(2).mean(dim=1, keepdim=True)
        amap = self.anomaly_map(error, tuple(images.shape[-2:]))
        return AnomalyOutput(score=self.map_score(amap), anomaly_map=amap)
