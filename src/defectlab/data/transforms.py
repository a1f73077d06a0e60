"""Image pre-processing: decoded images -> model input, for training, inference and export alike."""

from __future__ import annotations

from typing import Any

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


def check_brightness(brightness: float | None) -> None:
    """``data.brightness`` is None or a mean grey level in (0, 1] (ConfigError otherwise)."""
    number = isinstance(brightness, int | float) and not isinstance(brightness, bool)
    if brightness is not None and not (number and 0 < brightness <= 1):
        raise ConfigError(
            f"data.brightness={brightness}: give a mean grey level in (0, 1], e.g. 0.5, "
            "or null to keep each image's own brightness"
        )


def scale_brightness(images: torch.Tensor, target: float) -> torch.Tensor:
    """Images ``(..., C, H, W)`` in [0, 1], each scaled so that its mean value is ``target``.

    One factor per image over all its channels and pixels: colours and contrasts within an image
    keep their ratios, only its overall level (exposure, the drive current of an EL image)
    changes. An all-black image stays black.
    """
    mean = images.mean(dim=(-3, -2, -1), keepdim=True)
    return images * (target / mean.clamp_min(1e-6))


class MeanBrightness(v2.Transform):
    """:func:`scale_brightness` on images; masks and other inputs pass unchanged."""

    def __init__(self, target: float) -> None:
        super().__init__()
        self.target = target

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        return tv_tensors.wrap(scale_brightness(inpt.as_subclass(torch.Tensor), self.target), like=inpt)


def build_transform(
    image_size: int, crop_size: int | None, brightness: float | None = None
) -> v2.Compose:
    """Resize (and optionally centre-crop) images and masks alike; images become float in [0, 1].

    ``brightness``: None, or each image scaled to this mean value (:func:`scale_brightness`).
    """
    check_brightness(brightness)
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
    if brightness is not None:
        steps.append(MeanBrightness(float(brightness)))
    return v2.Compose(steps)


def center_crop_top(size: int, crop: int) -> int:
    """torchvision's centre-crop anchor: ``round((size - crop) / 2)``."""
    return round((size - crop) / 2.0)


def preprocess_uint8(
    images: torch.Tensor,
    image_size: int,
    crop_size: int | None = None,
    resize: nn.Module | None = None,
    brightness: float | None = None,
) -> torch.Tensor:
    """``uint8`` images ``(B, 3, H, W)`` -> float model input, as :func:`build_transform` does it.

    Plain tensor operations, so it runs inside exported graphs (:class:`defectlab.export.DeployModule`).
    ``resize``: a module that resizes to ``image_size`` (e.g. ``ExactResize``, reproducible in any
    runtime); None = torch's antialiased bilinear kernel on uint8, the one torchvision runs on CPU.
    ``brightness``: as ``data.brightness`` (:func:`scale_brightness`, after the crop).
    """
    if resize is not None:
        x = resize(images)
    else:
        # uint8 in, uint8 out: the antialiased kernel torchvision runs on uint8 CPU images.
        x = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True)
    if crop_size is not None:
        top = center_crop_top(image_size, crop_size)
        x = x[..., top : top + crop_size, top : top + crop_size]
    x = x.to(torch.float32).mul_(1.0 / 255)
    return x if brightness is None else scale_brightness(x, brightness)
