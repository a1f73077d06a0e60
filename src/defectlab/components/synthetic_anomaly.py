"""Synthetic anomalies pasted onto good images, with exact masks, to train a supervised segmenter.

No test image is ever used: the defects are made from the training images themselves (cut-paste
from another image, CutPaste, Li et al. 2021), from smooth random blobs (DRAEM-style, Zavrtanik
et al. 2021) and from thin line scratches. All randomness comes from a ``torch.Generator`` on the
CPU, so a seeded generator gives the same defects on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.errors import ConfigError

KINDS = ("cutpaste", "blob", "scratch")


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=g))


class SyntheticAnomalies(nn.Module):
    """Paste one random synthetic defect onto each image with probability ``probability``.

    Args:
        kinds: defect kinds to draw from (``cutpaste``, ``blob``, ``scratch``).
        probability: share of images that get a defect; the rest teach the model what normal is.
        min_area: smallest defect area (cut-paste, blob) as a fraction of the image.
        max_area: largest defect area as a fraction of the image.
        seed: seeds the generator used during training (validation uses its own fixed ones).
    """

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        probability: float = 0.5,
        min_area: float = 0.005,
        max_area: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ConfigError(f"anomalies.kinds={list(kinds)}: choose from {list(KINDS)}")
        if not 0 < probability <= 1:
            raise ConfigError(f"anomalies.probability must be in (0, 1], got {probability}")
        if not 0 < min_area <= max_area < 1:
            raise ConfigError(
                f"anomalies.min_area={min_area}, max_area={max_area}: need 0 < min <= max < 1"
            )
        self.kinds = list(kinds)
        self.probability = probability
        self.min_area = min_area
        self.max_area = max_area
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(images with defects (B, 3, H, W), masks (B, 1, H, W) in {0, 1})``."""
        g = self.generator if generator is None else generator
        out = images.clone()
        masks = torch.zeros(len(images), 1, *images.shape[-2:], device=images.device)
        for i in range(len(images)):
            if float(torch.rand((), generator=g)) >= self.probability:
                continue
            kind = self.kinds[_randint(g, len(self.kinds))]
            mask, content = getattr(self, f"_{kind}")(images, i, g)
            out[i] = torch.where(mask.bool(), content, out[i])
            masks[i] = mask
        return out, masks

    def _box(self, g: torch.Generator, h: int, w: int) -> tuple[int, int]:
        area = _uniform(g, self.min_area, self.max_area) * h * w
        aspect = math.exp(_uniform(g, math.log(0.3), math.log(3.3)))
        bh = max(2, min(h - 1, round(math.sqrt(area / aspect))))
        bw = max(2, min(w - 1, round(math.sqrt(area * aspect))))
        return bh, bw

    def _cutpaste(self, images: torch.Tensor, i: int, g: torch.Generator):
        # A patch of another image (or elsewhere in this one), colour-jittered so it does not
        # blend in perfectly, pasted at a random place.
        b, _, h, w = images.shape
        source = images[(i + 1 + _randint(g, b - 1)) % b] if b > 1 else images[i]
        bh, bw = self._box(g, h, w)
        sy, sx = _randint(g, h - bh + 1), _randint(g, w - bw + 1)
        ty, tx = _randint(g, h - bh + 1), _randint(g, w - bw + 1)
        gain = torch.tensor([_uniform(g, 0.6, 1.4) for _ in range(3)], device=images.device)
        content = images[i].clone()
        patch = source[:, sy : sy + bh, sx : sx + bw] * gain.view(3, 1, 1)
        content[:, ty : ty + bh, tx : tx + bw] = patch.clamp(0, 1)
        mask = torch.zeros(1, h, w, device=images.device)
        mask[:, ty : ty + bh, tx : tx + bw] = 1
        return mask, content

    def _blob(self, images: torch.Tensor, i: int, g: torch.Generator):
        # Smooth random field, thresholded at the quantile that gives the drawn area: irregular
        # blobs like stains or dents. Filled with a random colour modulated by the image.
        _, _, h, w = images.shape
        cells = 2 ** (2 + _randint(g, 3))  # 4, 8 or 16 cells across: blob scale
        field = torch.rand(1, 1, cells, cells, generator=g).to(images.device)
        field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)[0]
        area = _uniform(g, self.min_area, self.max_area)
        mask = (field >= torch.quantile(field.flatten(), 1 - area)).float()
        colour = torch.rand(3, 1, 1, generator=g).to(images.device)
        beta = _uniform(g, 0.5, 1.0)
        content = ((1 - beta) * images[i] + beta * colour * (0.5 + images[i])).clamp(0, 1)
        return mask, content

    def _scratch(self, images: torch.Tensor, i: int, g: torch.Generator):
        # A thin straight segment, much brighter or darker than the surface.
        _, _, h, w = images.shape
        y0, x0 = _uniform(g, 0.1, 0.9) * h, _uniform(g, 0.1, 0.9) * w
        angle = _uniform(g, 0, math.pi)
        half = _uniform(g, 0.1, 0.3) * max(h, w)
        dy, dx = half * math.sin(angle), half * math.cos(angle)
        width = max(1.0, _uniform(g, 0.005, 0.02) * max(h, w))
        ys = torch.arange(h, device=images.device, dtype=torch.float32).view(h, 1)
        xs = torch.arange(w, device=images.device, dtype=torch.float32).view(1, w)
        # Distance of every pixel to the segment (y0 - dy, x0 - dx) -> (y0 + dy, x0 + dx).
        t = (((ys - y0 + dy) * 2 * dy + (xs - x0 + dx) * 2 * dx) / (4 * half * half)).clamp(0, 1)
        dist = torch.hypot(ys - (y0 - dy + 2 * dy * t), xs - (x0 - dx + 2 * dx * t))
        mask = (dist <= width / 2).float().unsqueeze(0)
        level = _uniform(g, 0.85, 1.0) if _randint(g, 2) else _uniform(g, 0.0, 0.15)
        content = torch.full_like(images[i], level)
        return mask, content
