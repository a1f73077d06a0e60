"""Input-shape checks shared by the encoder-decoder models."""

import torch

from defectlab.errors import ConfigError


def check_divisible(images: torch.Tensor, depth: int) -> None:
    """Raise ConfigError unless the image sides of ``(B, C, H, W)`` are multiples of ``2**depth``."""
    factor = 2**depth
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ConfigError(
            f"image size {h}x{w} is not divisible by 2**model.depth = {factor}: set "
            f"data.image_size (and data.crop_size) to a multiple of {factor}"
        )
