"""U-Net defect segmenter (Ronneberger et al., MICCAI 2015), trained on pixel masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components import AnomalyMapGenerator, MapScore
from defectlab.components.shapes import check_divisible
from defectlab.errors import ConfigError
from defectlab.models.output import AnomalyOutput


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections predicting a per-pixel defect probability.

    Supervised: ``loss(images, masks)`` needs masks (synthetic anomalies on good images, optionally
    a few real labelled defects). Loss = class-balanced BCE + soft Dice. The anomaly map is the
    Gaussian-smoothed probability; the image score is its maximum (or ``topk_mean``).

    Args:
        depth: down-sampling stages; image sides must be divisible by ``2**depth``.
        channels: channels of the first stage, doubled at every further stage.
        dice_weight: weight of the Dice term beside the BCE term.
        max_pos_weight: cap of the BCE weight of defect pixels (``#good / #defect`` per batch):
            defects cover a few percent of the pixels, unweighted BCE would learn "never".
        score: ``max`` or ``topk_mean`` reduction of the map into the image score.
        topk: pixels averaged by ``topk_mean``.
        blur_sigma: Gaussian sigma of the probability map (pixels); 0 disables it.
    """

    supervised = True

    def __init__(
        self,
        depth: int = 4,
        channels: int = 32,
        dice_weight: float = 1.0,
        max_pos_weight: float = 50.0,
        score: str = "max",
        topk: int = 100,
        blur_sigma: float = 2.0,
    ) -> None:
        super().__init__()
        if depth < 1 or channels < 1:
            raise ConfigError(f"model.depth={depth} and model.channels={channels} must be >= 1")
        if max_pos_weight < 1:
            raise ConfigError(f"model.max_pos_weight must be >= 1, got {max_pos_weight}")
        self.depth = depth
        self.dice_weight = dice_weight
        self.max_pos_weight = max_pos_weight
        widths = [channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(
            _double_conv(cin, cout) for cin, cout in zip([3, *widths[:-1]], widths, strict=True)
        )
        self.up = nn.ModuleList(
            _double_conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.anomaly_map = AnomalyMapGenerator(blur_sigma)
        self.map_score = MapScore(score, topk)

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this (checked from the config before any work)."""
        return 2**self.depth

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Defect logits ``(B, 1, H, W)`` of images ``(B, 3, H, W)`` in [0, 1]."""
        check_divisible(images, self.depth)
        skips = []
        x = images
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Class-balanced BCE + soft Dice of images ``(B, 3, H, W)`` against masks ``(B, 1, H, W)``."""
        logits = self(images)
        target = masks.float()
        positives = target.sum()
        pos_weight = ((target.numel() - positives) / positives.clamp(min=1)).clamp(
            1.0, self.max_pos_weight
        )
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
        prob = torch.sigmoid(logits)
        # Over the whole batch: images without a defect still penalise false positives.
        dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        return bce + self.dice_weight * dice

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, H, W)``: smoothed defect probability and its maximum."""
        amap = self.anomaly_map(torch.sigmoid(self(images)), tuple(images.shape[-2:]))
        return AnomalyOutput(score=self.map_score(amap), anomaly_map=amap)
