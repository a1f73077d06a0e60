"""Patch scores -> full-resolution anomaly map (bilinear upsampling + Gaussian blur)."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur


class AnomalyMapGenerator(nn.Module):
    """Upsample a patch-score grid to image size and smooth it.

    Roth et al. upsample bilinearly and blur with a Gaussian of sigma 4 (scipy's
    ``gaussian_filter``, which truncates at 4 sigma); the kernel size here follows that truncation.

    Args:
        sigma: Gaussian sigma in output pixels; 0 disables the blur.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"model.blur_sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    @property
    def kernel_size(self) -> int:
        return 2 * math.ceil(4.0 * self.sigma) + 1

    def forward(self, patch_scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Map ``(B, 1, h, w)`` patch scores to a ``(B, 1, H, W)`` anomaly map."""
        amap = F.interpolate(patch_scores, size=size, mode="bilinear", align_corners=False)
        if self.sigma > 0:
            amap = gaussian_blur(amap, kernel_size=[self.kernel_size] * 2, sigma=[self.sigma] * 2)
        return amap
