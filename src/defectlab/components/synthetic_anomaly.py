"""Synthetic anomalies pasted onto good images, with exact masks, to train a supervised segmenter.

No test image is ever used: the defects are made from the training images themselves (cut-paste
from another image, CutPaste, Li et al. 2021), from smooth random blobs (DRAEM-style, Zavrtanik
et al. 2021), from thin line scratches, and from Perlin-noise regions (DRAEM) filled with a
texture that is not the product (images shipped with scikit-image) or with another good image of
the batch, rotated and shifted so that it no longer lines up. All randomness comes from a
``torch.Generator`` on the CPU, so a seeded generator gives the same defects on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components.perlin import perlin_mask
from defectlab.errors import ConfigError

KINDS = ("cutpaste", "blob", "scratch", "perlin_texture", "perlin_self")
CLASSIC_KINDS = KINDS[:3]  # the default draws, unchanged since val_synthetic_auroc was introduced
# Images shipped inside scikit-image (no download) with enough texture to fill a defect: the
# DRAEM paper fills from DTD, which is not available offline.
TEXTURES = (
    "brick",
    "grass",
    "gravel",
    "camera",
    "coffee",
    "astronaut",
    "chelsea",
    "coins",
    "moon",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cell",
    "text",
    "clock",
)


def load_textures(names: Sequence[str]) -> list[torch.Tensor]:
    """scikit-image's bundled images ``names`` as float ``(3, H, W)`` tensors in [0, 1]."""
    from skimage import data
    from skimage.util import img_as_float32

    out = []
    for name in names:
        image = torch.from_numpy(img_as_float32(getattr(data, name)()))
        image = image.unsqueeze(-1).expand(*image.shape, 3) if image.ndim == 2 else image[..., :3]
        out.append(image.permute(2, 0, 1).contiguous())
    return out


def uniform(g: torch.Generator, low: float, high: float) -> float:
    """One draw from ``[low, high)`` of generator ``g``."""
    return low + (high - low) * float(torch.rand((), generator=g))


def check_region_draws(
    key: str, probability: float, min_area: float, max_area: float, whole: bool = False
) -> None:
    """ConfigError naming ``<key>.*`` unless probability is in (0, 1] and 0 < min <= max < 1
    (``<= 1`` with ``whole``: a region may cover the whole map)."""
    if not 0 < probability <= 1:
        raise ConfigError(f"{key}.probability must be in (0, 1], got {probability}")
    top_ok = max_area <= 1 if whole else max_area < 1
    if not (0 < min_area <= max_area and top_ok):
        bound = "<= 1" if whole else "< 1"
        raise ConfigError(
            f"{key}.min_area={min_area}, max_area={max_area}: need 0 < min <= max {bound}"
        )


def _randint(g: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=g))


class SyntheticAnomalies(nn.Module):
    """Paste one random synthetic defect onto each image with probability ``probability``.

    Args:
        kinds: defect kinds to draw from (``cutpaste``, ``blob``, ``scratch``,
            ``perlin_texture``, ``perlin_self``).
        probability: share of images that get a defect; the rest teach the model what normal is.
        min_area: smallest defect area (all but scratches) as a fraction of the image.
        max_area: largest defect area as a fraction of the image.
        seed: seeds the generator used during training (validation uses its own fixed ones).
        textures: scikit-image images that ``perlin_texture`` fills from.
        exclude_textures: names left out of ``textures``, e.g. the product's own category when it
            is one of them (data.category): a defect must not look like the product.
        max_cells: finest Perlin lattice (cells per side) of the ``perlin_*`` masks.
        min_opacity: smallest weight of the fill against the image inside a ``perlin_*`` mask
            (DRAEM blends with weight U(0.2, 1)); faint defects teach small differences.
    """

    def __init__(
        self,
        kinds: Sequence[str] = CLASSIC_KINDS,
        probability: float = 0.5,
        min_area: float = 0.005,
        max_area: float = 0.05,
        seed: int = 0,
        textures: Sequence[str] = TEXTURES,
        exclude_textures: Sequence[str] = (),
        max_cells: int = 16,
        min_opacity: float = 0.2,
    ) -> None:
        super().__init__()
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ConfigError(f"anomalies.kinds={list(kinds)}: choose from {list(KINDS)}")
        check_region_draws("anomalies", probability, min_area, max_area)
        unknown = [t for t in textures if t not in TEXTURES]
        if unknown:
            raise ConfigError(
                f"anomalies.textures: {unknown} unknown; choose from {list(TEXTURES)}"
            )
        self.texture_names = [t for t in textures if t not in set(exclude_textures)]
        if "perlin_texture" in kinds and not self.texture_names:
            raise ConfigError(
                "anomalies.kinds has perlin_texture but no texture is left after "
                f"anomalies.exclude_textures={list(exclude_textures)}: add anomalies.textures"
            )
        if max_cells < 2:
            raise ConfigError(f"anomalies.max_cells must be >= 2, got {max_cells}")
        if not 0 < min_opacity <= 1:
            raise ConfigError(f"anomalies.min_opacity must be in (0, 1], got {min_opacity}")
        self.kinds = list(kinds)
        self.probability = probability
        self.min_area = min_area
        self.max_area = max_area
        self.seed = seed
        self.max_cells = max_cells
        self.min_opacity = min_opacity
        self.generator = torch.Generator().manual_seed(seed)
        self._textures: list[torch.Tensor] | None = None  # loaded on first use

    @property
    def textures(self) -> list[torch.Tensor]:
        if self._textures is None:
            self._textures = load_textures(self.texture_names)
        return self._textures

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
        area = uniform(g, self.min_area, self.max_area) * h * w
        aspect = math.exp(uniform(g, math.log(0.3), math.log(3.3)))
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
        gain = torch.tensor([uniform(g, 0.6, 1.4) for _ in range(3)], device=images.device)
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
        area = uniform(g, self.min_area, self.max_area)
        mask = (field >= torch.quantile(field.flatten(), 1 - area)).float()
        colour = torch.rand(3, 1, 1, generator=g).to(images.device)
        beta = uniform(g, 0.5, 1.0)
        content = ((1 - beta) * images[i] + beta * colour * (0.5 + images[i])).clamp(0, 1)
        return mask, content

    def _scratch(self, images: torch.Tensor, i: int, g: torch.Generator):
        # A thin straight segment, much brighter or darker than the surface.
        _, _, h, w = images.shape
        y0, x0 = uniform(g, 0.1, 0.9) * h, uniform(g, 0.1, 0.9) * w
        angle = uniform(g, 0, math.pi)
        half = uniform(g, 0.1, 0.3) * max(h, w)
        dy, dx = half * math.sin(angle), half * math.cos(angle)
        width = max(1.0, uniform(g, 0.005, 0.02) * max(h, w))
        ys = torch.arange(h, device=images.device, dtype=torch.float32).view(h, 1)
        xs = torch.arange(w, device=images.device, dtype=torch.float32).view(1, w)
        # Distance of every pixel to the segment (y0 - dy, x0 - dx) -> (y0 + dy, x0 + dx).
        t = (((ys - y0 + dy) * 2 * dy + (xs - x0 + dx) * 2 * dx) / (4 * half * half)).clamp(0, 1)
        dist = torch.hypot(ys - (y0 - dy + 2 * dy * t), xs - (x0 - dx + 2 * dx * t))
        mask = (dist <= width / 2).float().unsqueeze(0)
        level = uniform(g, 0.85, 1.0) if _randint(g, 2) else uniform(g, 0.0, 0.15)
        content = torch.full_like(images[i], level)
        return mask, content

    def _perlin_fill(
        self, image: torch.Tensor, fill: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # DRAEM: inside a Perlin mask the image becomes (1 - beta) * image + beta * fill.
        _, h, w = image.shape
        area = uniform(g, self.min_area, self.max_area)
        mask = perlin_mask(h, w, area, g, min_cells=2, max_cells=self.max_cells).to(image.device)
        if bool((image[0] == image[1]).all() and (image[1] == image[2]).all()):
            fill = fill.mean(dim=0, keepdim=True).expand_as(fill)  # grayscale product
        beta = uniform(g, self.min_opacity, 1.0)
        return mask, ((1 - beta) * image + beta * fill).clamp(0, 1)

    def _perlin_texture(self, images: torch.Tensor, i: int, g: torch.Generator):
        # A random crop of a foreign texture, randomly rotated, flipped and re-lit.
        _, _, h, w = images.shape
        texture = self.textures[_randint(g, len(self.textures))]
        th, tw = texture.shape[-2:]
        side = round(uniform(g, 0.25, 1.0) * min(th, tw))
        y, x = _randint(g, th - side + 1), _randint(g, tw - side + 1)
        crop = texture[None, :, y : y + side, x : x + side]
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        crop = torch.rot90(crop, _randint(g, 4), dims=(1, 2))
        if _randint(g, 2):
            crop = crop.flip(-1)
        gain, offset = uniform(g, 0.5, 1.5), uniform(g, -0.3, 0.3)
        fill = (crop.to(images.device) * gain + offset).clamp(0, 1)
        return self._perlin_fill(images[i], fill, g)

    def _perlin_self(self, images: torch.Tensor, i: int, g: torch.Generator):
        # Another good image of the batch, turned by 90/180/270 degrees (or mirrored) and shifted:
        # the product's own materials in a place and orientation where they do not belong.
        b, _, h, w = images.shape
        source = images[(i + 1 + _randint(g, b - 1)) % b] if b > 1 else images[i]
        k = 1 + _randint(g, 3)
        fill = torch.rot90(source, k, dims=(1, 2)) if h == w else source.flip(-1)
        fill = torch.roll(fill, shifts=(_randint(g, h), _randint(g, w)), dims=(1, 2))
        fill = (fill * uniform(g, 0.6, 1.4)).clamp(0, 1)
        return self._perlin_fill(images[i], fill, g)
