"""Image pre-processing: decoded images -> model input, for training, inference and export alike."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from defectlab.errors import ConfigError


def image_tensor(pil: Image.Image) -> tv_tensors.Image:
    """``(3, H, W)`` uint8 tensor of an RGB PIL image, ready for :func:`build_transform`."""
    return tv_tensors.Image(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))


def build_transform(image_size: int, crop_size: int | None) -> v2.Compose:
    """Resize (and optionally centre-crop) images and masks alike; images become float in [0, 1]."""
    if image_size <= 0:
        raise ConfigError(f"data.image_size must be positive, got {image_size}")
    if crop_size is not None and not 0 < crop_size <= image_size:
        raise ConfigError(
            f"data.crop_size={crop_size} must be in (0, data.image_size={image_size}]"
        )
    steps: list[v2.Transform] = [v2.Resize((image_size, image_size), antialias=True)]
    if crop_size is not None:
        steps.append(v2.CenterCrop(crop_size))
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    return v2.Compose(steps)


def center_crop_top(size: int, crop: int) -> int:
    """torchvision's centre-crop anchor: ``round((size - crop) / 2)``."""
    return round((size - crop) / 2.0)


def preprocess_uint8(
    images: torch.Tensor,
    image_size: int,
    crop_size: int | None = None,
    resize: nn.Module | None = None,
) -> torch.Tensor:
    """``uint8`` images ``(B, 3, H, W)`` -> float model input, as :func:`build_transform` does it.

    Plain tensor operations, so it runs inside exported graphs (:class:`defectlab.export.DeployModule`).
    ``resize``: a module that resizes to ``image_size`` (e.g. ``ExactResize``, reproducible in any
    runtime); None = torch's antialiased bilinear kernel on uint8, the one torchvision runs on CPU.
    """
    if resize is not None:
        x = resize(images)
    else:
        # uint8 in, uint8 out: the antialiased kernel torchvision runs on uint8 CPU images.
        x = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    if crop_size is not None:
        top = center_crop_top(image_size, crop_size)
        x = x[..., top : top + crop_size, top : top + crop_size]
    return x.to(torch.float32).mul_(1.0 / 255)
