"""Decoding images and masks with defined behaviour for every odd file, and the pre-run file check.

What each kind of input becomes (docs/data.md, "Image formats and bad files"):

- grayscale (``L``, ``1``), palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: converted to RGB;
- ``RGBA`` / ``LA`` / ``PA`` / palette with transparency: the alpha channel is dropped (colours kept);
- 16-bit grayscale (``I;16*``, and ``I`` with values in 0..65535): scaled to 8 bit (/257);
- 32-bit float (``F``) or ``I`` beyond 16 bit: refused (no defined intensity range);
- EXIF orientation: applied, so the pixels are upright as a viewer shows them;
- shorter side below ``min_side`` pixels, or more than ``max_pixels`` pixels: refused;
- zero-byte, truncated, corrupt or non-image files: refused.

Masks: any mode above; ``{0, 1}`` and ``{0, max}`` masks (max = 255, or 65535 for 16 bit) are
binary as they are; any other mask (antialiased edges, JPEG noise) is binarised at half range
(>= 128 for 8 bit) and a warning names it. A refused file raises :class:`DataError` naming the file and what to do.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from defectlab.errors import DataError

log = logging.getLogger(__name__)

MIN_SIDE = 8
MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
REMEDY = "Replace or remove the file, or set data.on_bad_file=skip."

# The size check below replaces Pillow's global bomb guard, which would refuse before it.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageLimits:
    """``data.min_image_side`` / ``data.max_image_pixels``: sizes outside are bad files."""

    min_side: int = MIN_SIDE
    max_pixels: int = MAX_PIXELS
    pixels_key: str = "data.max_image_pixels"  # the setting named when an image is refused


DEFAULT_LIMITS = ImageLimits()


def _open(path: Path, what: str, limits: ImageLimits) -> Image.Image:
    """Fully decoded image with EXIF orientation applied, or DataError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err}). Check the file's permissions.") from err
    if not data:
        raise DataError(f"{path}: zero-byte file, not an {what}. {REMEDY}")
    try:
        # No warnings.catch_warnings here: it swaps global state and is not thread-safe
        # (check_samples decodes in threads), which silenced unrelated warnings for good.
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise DataError(
                    f"{path}: {w}x{h} = {w * h} pixels exceeds {limits.pixels_key}="
                    f"{limits.max_pixels}. Downscale it, or raise the limit if it is genuine."
                )
            img.load()
            img = ImageOps.exif_transpose(img)
    except DataError:
        raise
    except UnidentifiedImageError as err:
        raise DataError(
            f"{path}: cannot be read as an {what} (not a recognised image format). {REMEDY}"
        ) from err
    except Exception as err:  # Pillow raises many types for corrupt data; all mean "unreadable"
        kind = "truncated" if "truncated" in str(err).lower() else "corrupt"
        raise DataError(
            f"{path}: cannot be read as an {what} ({kind}: {type(err).__name__}: {err}). {REMEDY}"
        ) from err
    if min(img.size) < limits.min_side:
        raise DataError(
            f"{path}: {img.size[0]}x{img.size[1]} is smaller than data.min_image_side="
            f"{limits.min_side} pixels. Replace or remove the file."
        )
    return img


def _to_8bit_gray(img: Image.Image, path: Path) -> Image.Image:
    if img.mode in SIXTEEN_BIT or img.mode == "I":
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"{path}: 32-bit integer image with values {values.min()}..{values.max()} "
                "(no defined range). Convert it to 8- or 16-bit."
            )
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    if img.mode == "F":
        raise DataError(
            f"{path}: 32-bit float image (no defined intensity range). Convert it to 8- or 16-bit."
        )
    return img


def load_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Open an image fully as 8-bit RGB (conversions in the module docstring), or raise DataError."""
    path = Path(path)
    img = _to_8bit_gray(_open(path, "image", limits), path)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_mask(
    path: str | Path,
    size: tuple[int, int],
    image_path: str | Path,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Binary mask ``(H, W)`` of the image's size (rules in the module docstring), or DataError."""
    path = Path(path)
    img = _open(path, "mask", limits)
    if img.size != size:
        raise DataError(
            f"{path}: mask size {img.size} differs from its image {image_path} {size}; "
            "masks must have the image's width and height"
        )
    if img.mode in SIXTEEN_BIT or img.mode == "I":
        values, top = np.asarray(img, dtype=np.int64), 65535
    elif img.mode == "F":
        raise DataError(f"{path}: 32-bit float mask. Save masks as 8-bit 0/255 PNGs.")
    else:
        values, top = np.asarray(img.convert("L")), 255
    present = np.flatnonzero(np.bincount(values.ravel().clip(0, top), minlength=2))
    levels = set(present.tolist())
    if levels <= {0, 1} or levels <= {0, top}:
        return values > 0
    log.warning(
        "%s: mask is not binary (%d grey levels); pixels >= %d count as defective",
        path,
        len(levels),
        (top + 1) // 2,
    )
    return values >= (top + 1) // 2
