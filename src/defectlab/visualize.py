"""Pictures of a run: per-image panels (PIL, fast) and per-run plots (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: no display, no global figure state
from PIL import Image, ImageDraw
from scipy import ndimage
from torchmetrics.classification import BinaryPrecisionRecallCurve, BinaryROC

from defectlab.metrics.image import unit_interval

# Pixel curves over millions of pixels: binned thresholds keep memory flat (plots only; the
# reported pixel AUROC is exact).
PIXEL_CURVE_BINS = 512
HEADER_PX = 14
SEG_COLOUR = np.array([255, 40, 40], dtype=np.float32)
CONTOUR_COLOUR = np.array([0, 255, 0], dtype=np.uint8)


def heatmap_rgb(anomaly_map: np.ndarray, vmin: float, threshold: float) -> np.ndarray:
    """``(H, W)`` map -> ``(H, W, 3)`` uint8 jet colours on a fixed, leak-free scale.

    ``vmin`` (the lowest held-out good value) is blue and the pixel threshold sits in the middle of
    the colour map, so red always means "well above the threshold", comparable across images.
    """
    span = max(threshold - vmin, 1e-12)
    level = np.clip((anomaly_map - vmin) / (2 * span), 0, 1)
    return (colormaps["jet"](level)[..., :3] * 255).astype(np.uint8)


def display_image(image: torch.Tensor) -> np.ndarray:
    """A model input ``(3, H, W)`` float in [0, 1] as ``(H, W, 3)`` uint8 for display."""
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


def overlay_rgb(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Half-and-half blend of an ``(H, W, 3)`` uint8 image and its heatmap colours."""
    return (0.5 * image + 0.5 * heat).astype(np.uint8)


def image_panel(
    image: np.ndarray,
    anomaly_map: np.ndarray | None,
    segmentation: np.ndarray | None,
    mask: np.ndarray | None,
    vmin: float,
    threshold: float,
    title: str,
) -> Image.Image:
    """One PNG row: original | heatmap | overlay | binary segmentation (+ ground-truth contour).

    Args:
        image: ``(H, W, 3)`` uint8; anomaly_map: ``(H, W)`` raw map; segmentation: ``(H, W)``
            bool at the pixel threshold; mask: ``(H, W)`` bool ground truth or None. Without a map
            (image-level models) the panel is the original, with the contour if a mask exists.
    """
    if anomaly_map is None or segmentation is None:
        row = image.copy()
        if mask is not None and mask.any():
            row[_contour(mask)] = CONTOUR_COLOUR
        return _with_header(row, title)
    heat = heatmap_rgb(anomaly_map, vmin, threshold)
    overlay = overlay_rgb(image, heat)
    seg = image.astype(np.float32) * 0.35
    seg[segmentation] = 0.35 * seg[segmentation] + 0.65 * SEG_COLOUR
    seg = seg.astype(np.uint8)
    if mask is not None and mask.any():
        contour = _contour(mask)
        for tile in (overlay, seg):
            tile[contour] = CONTOUR_COLOUR
    return _with_header(np.concatenate([image, heat, overlay, seg], axis=1), title)


def _contour(mask: np.ndarray) -> np.ndarray:
    """One-pixel inner boundary of a bool mask."""
    return mask & ~ndimage.binary_erosion(mask, iterations=1, border_value=0)


def _with_header(row: np.ndarray, title: str) -> Image.Image:
    canvas = Image.new("RGB", (row.shape[1], row.shape[0] + HEADER_PX), "black")
    canvas.paste(Image.fromarray(row), (0, HEADER_PX))
    ImageDraw.Draw(canvas).text((2, 1), title, fill="white")
    return canvas


def _curve(kind: str, scores: torch.Tensor, labels: torch.Tensor, bins: int | None):
    metric = BinaryROC if kind == "roc" else BinaryPrecisionRecallCurve
    x, y, _ = metric(thresholds=bins)(unit_interval(scores.flatten()), labels.flatten().long())
    return (x, y) if kind == "roc" else (y, x)  # PR plotted as recall (x) vs precision (y)


def _axes(width: float, height: float):
    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_curves(
    outputs: Mapping[str, Any], metrics: Mapping[str, Any], kind: str, path: Path
) -> Path:
    """ROC (``kind="roc"``) or precision-recall (``"pr"``) curves, image and pixel level."""
    fig, ax = _axes(4.6, 4.2)
    levels = [("image", outputs["scores"], outputs["labels"], None)]
    if outputs.get("maps") is not None:
        levels.append(("pixel", outputs["maps"], outputs["masks"], PIXEL_CURVE_BINS))
    for level, scores, labels, bins in levels:
        if labels.min() == labels.max():
            continue
        x, y = _curve(kind, scores, labels, bins)
        key = f"{level}_auroc" if kind == "roc" else f"{level}_aupr"
        value = metrics.get(key)
        label = level if value is None else f"{level} ({key.split('_')[1].upper()} {value:.3f})"
        ax.plot(x.numpy(), y.numpy(), label=label)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    else:
        ax.set(xlabel="recall", ylabel="precision", title="precision-recall")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right" if kind == "roc" else "lower left")
    return _save(fig, path)


def plot_histogram(
    scores: torch.Tensor, labels: torch.Tensor, threshold: float | None, path: Path
) -> Path:
    """Score histograms of good vs defective test images, with the deployed threshold line."""
    fig, ax = _axes(5.5, 3.6)
    s = scores.double().numpy()
    bins = np.histogram_bin_edges(s, bins=40)
    for cls, name, colour in ((0, "good", "tab:blue"), (1, "defective", "tab:red")):
        ax.hist(s[labels.numpy() == cls], bins=bins, alpha=0.6, label=name, color=colour)
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="image score (raw)", ylabel="test images", title="score distribution")
    ax.legend()
    return _save(fig, path)


def plot_confusion(confusion: Mapping[str, int | None], path: Path) -> Path:
    """2x2 confusion matrix at the deployed threshold."""
    cm = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    fig, ax = _axes(3.6, 3.2)
    ax.imshow(cm, cmap="Blues")
    for (r, c), value in np.ndenumerate(cm):
        dark = value > cm.max() / 2
        ax.text(c, r, str(value), ha="center", va="center", color="white" if dark else "black")
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["good", "defective"],
        yticklabels=["good", "defective"],
        xlabel="predicted",
        ylabel="actual",
        title="confusion at threshold",
    )
    return _save(fig, path)


PER_TYPE_KEYS = ("image_auroc", "image_recall", "pixel_aupro")


def _defect_types(per_type: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Defect types (``<category>/<type>``, not ``good``) and the metrics any of them has."""
    types = [t for t in per_type if t.rsplit("/", 1)[-1] != "good"]
    keys = [k for k in PER_TYPE_KEYS if any(per_type[t].get(k) is not None for t in types)]
    return types, keys


def plot_per_type(per_type: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Bars per defect type: image AUROC, recall at the threshold and (with masks) AUPRO."""
    types, keys = _defect_types(per_type)
    fig, ax = _axes(max(4.0, 1.1 * len(types) + 2), 3.9)
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        values = [per_type[t].get(key) or 0.0 for t in types]
        ax.bar(np.arange(len(types)) + i * width, values, width, label=key)
    ax.set_xticks(np.arange(len(types)) + width * (len(keys) - 1) / 2, types)
    ax.set(ylim=(0, 1.05), ylabel="value", title="per defect type")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(keys))
    return _save(fig, path)


def save_run_plots(
    outputs: Mapping[str, Any], results: Mapping[str, Any], folder: Path
) -> dict[str, Path]:
    """Write every per-run plot into ``folder``; returns ``{name: path}``."""
    metrics = results["metrics"]
    plots = {
        "roc": plot_curves(outputs, metrics, "roc", folder / "roc.png"),
        "pr": plot_curves(outputs, metrics, "pr", folder / "pr.png"),
        "score_histogram": plot_histogram(
            outputs["scores"],
            outputs["labels"],
            results["threshold"]["image_threshold"],
            folder / "score_histogram.png",
        ),
    }
    if _defect_types(results["per_defect_type"])[1]:  # a test set of good images only has none
        plots["per_defect_type"] = plot_per_type(
            results["per_defect_type"], folder / "per_defect_type.png"
        )
    if results["confusion_matrix"]["tp"] is not None:
        plots["confusion"] = plot_confusion(results["confusion_matrix"], folder / "confusion.png")
    return plots
