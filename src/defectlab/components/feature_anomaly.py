"""Anomalies synthesised in feature space: Gaussian noise inside Perlin regions of feature maps.

SimpleNet (Liu et al., CVPR 2023) and SuperSimpleNet (Rolih et al., ICPR 2024) add Gaussian noise
to a frozen pretrained network's features and train a small head to tell noisy from clean
features. The head learns the boundary of the normal feature distribution instead of the look of
one drawing style, which is what lets it carry over to real defects. SuperSimpleNet confines the
noise to Perlin-shaped regions so that the head also learns to localise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components.perlin import perlin_mask
from defectlab.components.synthetic_anomaly import check_region_draws, uniform
from defectlab.errors import ConfigError


class FeatureNoise(nn.Module):
    """Add ``N(0, std^2)`` noise to standardised feature maps inside one Perlin mask per image.

    The mask is drawn at the resolution of the finest feature map and resized (nearest) to the
    others, so every level is perturbed at the same image location.

    Args:
        probability: share of images that get noisy features.
        std: noise standard deviation, in units of the (standardised) feature channels.
        min_area: smallest noisy area as a fraction of the map.
        max_area: largest noisy area as a fraction of the map; ``min_area = max_area = 1``
            noises every position (SimpleNet's noisy copies, ``decoder=patch``).
        max_cells: finest Perlin lattice (cells per side) of the mask.
        seed: seeds the generator used during training (validation passes its own fixed ones).
    """

    def __init__(
        self,
        probability: float = 0.5,
        std: float = 0.5,
        min_area: float = 0.01,
        max_area: float = 0.2,
        max_cells: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_region_draws("feature_noise", probability, min_area, max_area, whole=True)
        if std <= 0:
            raise ConfigError(f"feature_noise.std must be > 0, got {std}")
        self.probability = probability
        self.std = std
        self.min_area = min_area
        self.max_area = max_area
        self.max_cells = max_cells
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def forward(
        self, features: list[torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Return ``(noisy features, masks (B, 1, h0, w0))``; ``h0 x w0`` is the finest map."""
        generator = self.generator if generator is None else generator
        b = len(features[0])
        h0, w0 = max(f.shape[-2] for f in features), max(f.shape[-1] for f in features)
        masks = torch.zeros(b, 1, h0, w0)
        for i in range(b):
            if float(torch.rand((), generator=generator)) >= self.probability:
                continue
            area = uniform(generator, self.min_area, self.max_area)
            if area >= 1:  # the whole map (SimpleNet: every patch of the noisy copy)
                masks[i] = 1
                continue
            masks[i] = perlin_mask(h0, w0, area, generator, max_cells=self.max_cells)
        masks = masks.to(features[0].device)
        noisy = []
        for f in features:
            m = F.interpolate(masks, size=f.shape[-2:], mode="nearest")
            noise = torch.randn(f.shape, generator=generator).to(f.device) * self.std
            noisy.append(f + noise * m)
        return noisy, masks
