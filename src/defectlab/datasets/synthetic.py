"""Synthetic MVTec-layout data: real textures (scikit-image) with painted defects and exact masks.

Each category is one 512 px texture shipped with scikit-image (``brick``, ``grass``, ``gravel``).
Images are random crops of it, tinted to RGB; defective test images carry one defect of a type
(``scratch``: a thin line, ``hole``: a dark ellipse, ``stain``: a coloured blotch) and its mask.
Deterministic for a given seed, small and fast: meant for pixel-level tests and demos.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from defectlab.datasets.cache import prepare_category
from defectlab.errors import ConfigError

TEXTURES = ("brick", "grass", "gravel")
DEFECT_TYPES = ("scratch", "hole", "stain")


def _texture(name: str) -> np.ndarray:
    from skimage import data

    return np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0


def _crop(texture: np.ndarray, size: int, rng: np.random.Generator, tint: np.ndarray) -> np.ndarray:
    y, x = rng.integers(0, texture.shape[0] - size, size=2)
    patch = texture[y : y + size, x : x + size]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.clip(patch[..., None] * tint, 0, 1)


def _defect_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = rng.uniform(0.25, 0.75, size=2) * size
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.2, 0.35) * size
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=max(2, size // 40))
    else:
        r = rng.uniform(0.07, 0.13) * size
        ry = r * rng.uniform(0.6, 1.0)
        draw.ellipse([cx - r, cy - ry, cx + r, cy + ry], fill=255)
    return np.asarray(canvas) > 0


def _paint(image: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    out = image.copy()
    if kind == "scratch":
        out[mask] = rng.uniform(0.85, 1.0)
    elif kind == "hole":
        out[mask] = rng.uniform(0.0, 0.08, size=(int(mask.sum()), 3))
    else:  # stain: strong colour cast over the texture
        out[mask] = np.clip(out[mask] * 0.4 + np.array([0.7, 0.15, 0.1]), 0, 1)
    return out


def _save(array: np.ndarray, path: Path) -> None:
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


class SyntheticPreparer:
    """Write synthetic categories into ``<root>/<texture>/`` in MVTec AD layout.

    Args:
        categories: texture names (subset of ``brick``, ``grass``, ``gravel``).
        defect_types: defect kinds painted on test images.
        image_size: side of the square images in pixels.
        num_train: good training images per category.
        num_test_good: good test images per category.
        num_test_defect: defective test images per defect type.
        seed: seeds every random choice.
    """

    def __init__(
        self,
        categories: tuple[str, ...] = TEXTURES,
        defect_types: tuple[str, ...] = DEFECT_TYPES,
        image_size: int = 128,
        num_train: int = 40,
        num_test_good: int = 10,
        num_test_defect: int = 5,
        seed: int = 0,
    ) -> None:
        for key, values, valid in (
            ("categories", categories, TEXTURES),
            ("defect_types", defect_types, DEFECT_TYPES),
        ):
            unknown = set(values) - set(valid)
            if unknown:
                raise ConfigError(
                    f"data.prepare.{key}: {sorted(unknown)} unknown; choose from {valid}"
                )
        if not 16 <= image_size <= 500:
            raise ConfigError(f"data.prepare.image_size must be in [16, 500], got {image_size}")
        self.categories = tuple(categories)
        self.defect_types = tuple(defect_types)
        self.image_size = image_size
        self.num_train = num_train
        self.num_test_good = num_test_good
        self.num_test_defect = num_test_defect
        self.seed = seed

    def __call__(self, root: Path) -> None:
        for c, category in enumerate(self.categories):
            params = {
                "source": "synthetic",
                "category": category,
                "defect_types": list(self.defect_types),
                "image_size": self.image_size,
                "num_train": self.num_train,
                "num_test_good": self.num_test_good,
                "num_test_defect": self.num_test_defect,
                "seed": self.seed,
            }
            prepare_category(
                Path(root), category, params, lambda out, c=c, n=category: self._write(out, n, c)
            )

    def _write(self, out: Path, category: str, offset: int) -> None:
        rng = np.random.default_rng([self.seed, offset])
        texture = _texture(category)
        tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        size = self.image_size
        for folder, count in (("train/good", self.num_train), ("test/good", self.num_test_good)):
            (out / folder).mkdir(parents=True)
            for i in range(count):
                _save(_crop(texture, size, rng, tint), out / folder / f"{i:03d}.png")
        for kind in self.defect_types:
            (out / "test" / kind).mkdir(parents=True)
            (out / "ground_truth" / kind).mkdir(parents=True)
            for i in range(self.num_test_defect):
                mask = _defect_mask(kind, size, rng)
                image = _paint(_crop(texture, size, rng, tint), mask, kind, rng)
                _save(image, out / "test" / kind / f"{i:03d}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(
                    out / "ground_truth" / kind / f"{i:03d}_mask.png"
                )
