"""Dataset report before training: ``python -m defectlab.eda data=<elpv|synthetic|mvtec> ...``.

Counts per category / split / defect type, image sizes and modes, per-channel intensity histograms
of good vs defective images, where defects sit (average mask), how large they are, and an
integrity scan (unreadable, truncated, zero-byte, wrong-mode, off-size and duplicate files;
masks without images and defective images without masks). Writes ``eda.html`` (figures inline)
and ``eda.json`` (the numbers) into the Hydra run folder.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.utils import instantiate
from matplotlib.figure import Figure
from omegaconf import DictConfig
from PIL import Image

from defectlab.data import (
    GOOD,
    MASK_SUFFIX,
    images_in,
    mask_path,
    orphan_masks,
    split_folders,
)
from defectlab.errors import DataError
from defectlab.results import write_json_atomic

# Modes a loader converts without loss of meaning (grayscale is replicated to RGB).
IMAGE_MODES = ("RGB", "L")
MASK_MODES = ("L", "1", "P")


@dataclass
class CategoryScan:
    """What one category folder holds, and what is wrong with it."""

    counts: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    image_sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)  # readable images
    modes: Counter = field(default_factory=Counter)
    problems: list[dict[str, str]] = field(default_factory=list)
    readable: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))
    masks: dict[Path, Path] = field(default_factory=dict)

    @property
    def sizes(self) -> Counter:
        """Readable images per ``(width, height)``."""
        return Counter(self.image_sizes.values())

    def problem(self, kind: str, path: Path, detail: str) -> None:
        self.problems.append({"kind": kind, "path": str(path), "detail": detail})


def _open(path: Path, data: bytes | None = None) -> tuple[Image.Image | None, str | None]:
    """Fully decoded image, or the reason it is not one (zero-byte, truncated, unreadable)."""
    data = path.read_bytes() if data is None else data
    if not data:
        return None, "zero_byte"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.copy(), None
    except OSError as err:
        return None, "truncated" if "truncated" in str(err) else "unreadable"
    except (SyntaxError, ValueError, Image.DecompressionBombError):
        return None, "unreadable"


def scan_category(base: Path) -> CategoryScan:
    """Scan ``<root>/<category>`` in MVTec layout (no exception for what is wrong: it is listed).

    Folders, image files and mask names follow :mod:`defectlab.data.layout`, the DataModule's
    own rules, so the report lists what a training run would see.
    """
    scan = CategoryScan()
    hashes: dict[str, Path] = {}
    groups = split_folders(base)
    if not groups:
        scan.problem("missing_layout", base, "no train/<type> or test/<type> folders")
    for split, folder in groups:
        images = images_in(folder)
        scan.counts[split][folder.name] = len(images)
        if not images:
            scan.problem("empty_folder", folder, "holds no image")
        for path in images:
            data = path.read_bytes()  # once: decoded and hashed
            image, error = _open(path, data)
            if error is not None:
                scan.problem(error, path, "cannot be decoded")
                continue
            digest = hashlib.sha1(data).hexdigest()
            if digest in hashes:
                scan.problem("duplicate", path, f"same bytes as {hashes[digest]}")
            hashes.setdefault(digest, path)
            scan.image_sizes[path] = image.size
            scan.modes[image.mode] += 1
            if image.mode not in IMAGE_MODES:
                scan.problem(
                    "wrong_mode", path, f"mode {image.mode}, expected one of {IMAGE_MODES}"
                )
            scan.readable[f"{split}/{folder.name}"].append(path)
    if scan.image_sizes:
        (common, _), *_ = scan.sizes.most_common(1)
        for path, size in scan.image_sizes.items():
            if size != common:
                scan.problem("wrong_size", path, f"{size}, most images are {common}")
    _scan_masks(base, scan)
    return scan


def _scan_masks(base: Path, scan: CategoryScan) -> None:
    """Masks by the DataModule's rules: ``ground_truth/<type>/<image stem>_mask.png``."""
    gt = base / "ground_truth"
    if not gt.is_dir():
        return
    for mask in orphan_masks(base / "test", gt):
        stem = mask.stem.removesuffix(MASK_SUFFIX)
        scan.problem("orphan_mask", mask, f"no image test/{mask.parent.name}/{stem}.*")
    for key, paths in scan.readable.items():
        split, defect_type = key.split("/", 1)
        if split != "test" or defect_type == GOOD:
            continue
        for path in paths:
            mask = mask_path(gt, defect_type, path)
            if not mask.is_file():
                scan.problem("missing_mask", path, f"no ground_truth/{defect_type}/{mask.name}")
                continue
            m, error = _open(mask)
            if error is not None:
                scan.problem(error, mask, "mask cannot be decoded")
                continue
            if m.mode not in MASK_MODES:
                scan.problem("wrong_mode", mask, f"mask mode {m.mode}, expected {MASK_MODES}")
            size = scan.image_sizes.get(path)
            if size is not None and size != m.size:
                scan.problem("wrong_size", mask, f"mask {m.size}, image {size}")
                continue
            scan.masks[path] = mask


def _rgb_histograms(paths: list[Path], bins: int) -> np.ndarray:
    """Mean normalised per-channel histogram ``(3, bins)`` of RGB-converted images."""
    total = np.zeros((3, bins))
    for path in paths:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        for c in range(3):
            hist, _ = np.histogram(pixels[..., c], bins=bins, range=(0, 256))
            total[c] += hist / hist.sum()
    return total / max(len(paths), 1)


def _mask_stats(masks: list[Path], size: int) -> tuple[np.ndarray | None, list[float]]:
    """Average mask (``size`` x ``size``) and each mask's defective area fraction."""
    if not masks:
        return None, []
    heat = np.zeros((size, size))
    areas = []
    for path in masks:
        with Image.open(path) as img:
            m = np.asarray(img.convert("L")) > 0
        areas.append(float(m.mean()))
        heat += np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size))) / 255
    return heat / len(masks), areas


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode()


def _sample(paths: list[Path], limit: int, rng: np.random.Generator) -> list[Path]:
    if len(paths) <= limit:
        return paths
    return sorted(paths[i] for i in rng.choice(len(paths), limit, replace=False))


def analyse(root: Path, categories: list[str], max_images: int, seed: int) -> dict[str, Any]:
    """The numbers and figures of the report, per category."""
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {"root": str(root), "categories": {}}
    figures: dict[str, dict[str, str]] = {}
    for category in categories:
        scan = scan_category(root / category)
        good = scan.readable.get(f"train/{GOOD}", []) + scan.readable.get(f"test/{GOOD}", [])
        defective = [
            p
            for k, v in scan.readable.items()
            if k.startswith("test/") and not k.endswith(f"/{GOOD}")
            for p in v
        ]
        hist_good = _rgb_histograms(_sample(good, max_images, rng), 64)
        hist_bad = _rgb_histograms(_sample(defective, max_images, rng), 64)
        heat, areas = _mask_stats(list(scan.masks.values()), 64)
        report["categories"][category] = {
            "counts": {k: dict(v) for k, v in scan.counts.items()},
            "sizes": {f"{w}x{h}": n for (w, h), n in scan.sizes.most_common()},
            "modes": dict(scan.modes),
            "intensity_mean": {
                "good": (hist_good @ (np.arange(64) * 4 + 2)).tolist() if good else None,
                "defective": (hist_bad @ (np.arange(64) * 4 + 2)).tolist() if defective else None,
            },
            "masks": len(scan.masks),
            "mask_area": {
                "median": float(np.median(areas)) if areas else None,
                "min": min(areas) if areas else None,
                "max": max(areas) if areas else None,
            },
            "problems": scan.problems,
        }
        figures[category] = _category_figures(category, scan, hist_good, hist_bad, heat, areas)
    report["problem_count"] = sum(len(c["problems"]) for c in report["categories"].values())
    report["figures"] = figures
    return report


def _category_figures(category, scan, hist_good, hist_bad, heat, areas) -> dict[str, str]:
    out = {}
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    splits = sorted(scan.counts)
    types = sorted({t for s in scan.counts.values() for t in s})
    bottom = np.zeros(len(splits))
    for t in types:
        values = np.array([scan.counts[s].get(t, 0) for s in splits])
        ax.bar(splits, values, bottom=bottom, label=t)
        bottom += values
    ax.set_ylabel("images")
    ax.set_title(f"{category}: images per split and type", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["counts"] = _png(fig)

    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    x = np.arange(64) * 4 + 2
    # Grayscale data has three identical channels: one curve each says it plainly.
    channels = ("gray",) if set(scan.modes) <= {"L"} else ("red", "green", "blue")
    for c, name in enumerate(channels):
        colour = "black" if name == "gray" else name
        ax.plot(x, hist_good[c], color=colour, label=f"{name} good")
        ax.plot(x, hist_bad[c], color=colour, linestyle="--", label=f"{name} defective")
    ax.set_xlabel("intensity")
    ax.set_ylabel("share of pixels")
    ax.set_title(f"{category}: per-channel intensity, good vs defective", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out["intensity"] = _png(fig)

    if heat is not None:
        fig = Figure(figsize=(6, 3))
        left, right = fig.subplots(1, 2)
        shown = left.imshow(heat, cmap="hot", vmin=0)
        fig.colorbar(shown, ax=left, fraction=0.046)
        left.set_title("where defects sit (mean mask)", fontsize=9)
        left.axis("off")
        right.hist(areas, bins=20)
        right.set_xlabel("defect area / image area")
        right.set_title("mask-area distribution", fontsize=9)
        fig.tight_layout()
        out["masks"] = _png(fig)
    return out


def to_html(report: dict[str, Any]) -> str:
    """One self-contained page: tables of numbers, figures inline, problems listed."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>defectlab dataset report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
        f"<h1>Dataset report</h1><p>root: <code>{html.escape(report['root'])}</code>; "
        f"{report['problem_count']} problems found</p>",
    ]
    for category, info in report["categories"].items():
        parts.append(f"<h2 id='{html.escape(category)}'>{html.escape(category)}</h2>")
        rows = "".join(
            f"<tr><td>{split}</td><td>{html.escape(t)}</td><td>{n}</td></tr>"
            for split, types in info["counts"].items()
            for t, n in types.items()
        )
        parts.append(f"<table><tr><th>split</th><th>type</th><th>images</th></tr>{rows}</table>")
        parts.append(
            f"<p>sizes (w x h): {html.escape(str(info['sizes']))}; modes: "
            f"{html.escape(str(info['modes']))}; masks: {info['masks']}; mask area "
            f"{html.escape(str(info['mask_area']))}</p>"
        )
        for name, data in report["figures"][category].items():
            parts.append(f"<img alt='{category} {name}' src='data:image/png;base64,{data}'>")
        if info["problems"]:
            items = "".join(
                f"<tr><td>{p['kind']}</td><td><code>{html.escape(p['path'])}</code></td>"
                f"<td>{html.escape(p['detail'])}</td></tr>"
                for p in info["problems"]
            )
            parts.append(
                f"<h3>Integrity problems ({len(info['problems'])})</h3><table>"
                f"<tr><th>kind</th><th>file</th><th>detail</th></tr>{items}</table>"
            )
        else:
            parts.append("<p>Integrity scan: no problems.</p>")
    return "\n".join(parts)


def run_eda(cfg: DictConfig) -> dict[str, Any]:
    """The job behind ``python -m defectlab.eda``."""
    root = Path(cfg.data.root)
    if cfg.data.get("prepare") is not None:
        instantiate(cfg.data.prepare)(root)
    if not root.is_dir():
        raise DataError(f"data.root={root} is not a folder")
    found = sorted(
        p.name for p in root.iterdir() if (p / "train").is_dir() or (p / "test").is_dir()
    )
    categories = list(cfg.categories) if cfg.categories else found
    unknown = sorted(set(categories) - set(found))
    if unknown:
        raise DataError(f"categories {unknown} not under {root}; found: {found}")
    report = analyse(root, categories, cfg.max_images_per_group, cfg.seed)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eda.html").write_text(to_html(report))
    numbers = {k: v for k, v in report.items() if k != "figures"}
    write_json_atomic(out / "eda.json", numbers)
    for category, info in report["categories"].items():
        print(
            f"{category}: {info['counts']} sizes {info['sizes']} problems {len(info['problems'])}"
        )
        for p in info["problems"]:
            print(f"  {p['kind']}: {p['path']} ({p['detail']})")
    print(f"report: {out / 'eda.html'}")
    return numbers


@hydra.main(version_base="1.3", config_path="../../conf", config_name="eda")
def main(cfg: DictConfig) -> None:
    """Write the dataset report."""
    run_eda(cfg)


if __name__ == "__main__":
    main()
