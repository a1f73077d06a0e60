"""Pixel-level metrics: AUROC (torchmetrics), AUPRO (MVTec AD protocol) and F1 at a threshold."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torchmetrics.classification import BinaryAUROC

from defectlab.metrics.image import both_classes, unit_interval

# 8-connectivity, as in the MVTec AD evaluation code: diagonal neighbours belong to one region.
CONNECTIVITY = np.ones((3, 3), dtype=int)


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and per-region-overlap (PRO) at every distinct score, from strict to permissive.

    Every ground-truth region (8-connected component of a mask) counts equally, whatever its
    size: PRO(t) = mean over regions of |region ∩ {map >= t}| / |region|, and FPR(t) is the share
    of all defect-free pixels with map >= t. One sort gives the whole curve: each pixel adds
    1 / #normal pixels to the FPR or 1 / (#regions · |its region|) to the PRO once the threshold
    passes its score.

    Args:
        maps: ``(N, H, W)`` anomaly maps.
        masks: ``(N, H, W)`` bool ground truth.

    Returns:
        ``(fpr, pro)``, both starting at 0 and ending at 1 (when regions and normal pixels exist).
    """
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=CONNECTIVITY)
        region_ids[i] = np.where(labeled > 0, labeled + offset, 0)
        offset += n
    n_regions = offset
    sizes = np.bincount(region_ids.ravel(), minlength=n_regions + 1)
    weight = np.zeros(n_regions + 1)  # id 0 = defect-free pixel: no PRO contribution
    weight[1:] = 1.0 / (n_regions * sizes[1:])

    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    ids = region_ids.ravel()[order]
    fpr = np.cumsum(ids == 0) / sizes[0]
    pro = np.cumsum(weight[ids])
    # Equal scores share one threshold: keep the last position of each run of ties.
    last = np.append(scores[1:] != scores[:-1], True)
    fpr = np.concatenate([[0.0], np.clip(fpr[last], 0, 1)])
    pro = np.concatenate([[0.0], np.clip(pro[last], 0, 1)])
    return fpr, pro


def partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under the increasing polyline ``(x, y)`` from 0 to ``x_max``."""
    end = int(np.searchsorted(x, x_max, side="right"))  # x[end - 1] <= x_max < x[end]
    xs, ys = x[:end], y[:end]
    if end < len(x) and x[end] > x[end - 1]:
        t = (x_max - x[end - 1]) / (x[end] - x[end - 1])
        xs = np.append(xs, x_max)
        ys = np.append(ys, y[end - 1] + t * (y[end] - y[end - 1]))
    return float(np.trapezoid(ys, xs))


def aupro(maps: torch.Tensor, masks: torch.Tensor, max_fpr: float = 0.3) -> float | None:
    """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr`` so 1.0 is perfect.

    Args:
        maps: ``(N, 1, H, W)`` or ``(N, H, W)`` anomaly maps.
        masks: same shape, non-zero = defective.
        max_fpr: integration limit on the false-positive rate (0.3 in the MVTec AD paper).
    """
    if not 0 < max_fpr <= 1:
        raise ValueError(f"eval.max_fpr must be in (0, 1], got {max_fpr}")
    m = masks.detach().cpu().numpy().astype(bool).reshape(-1, *masks.shape[-2:])
    if not m.any() or m.all():
        return None
    a = maps.detach().cpu().double().numpy().reshape(m.shape)
    fpr, pro = pro_curve(a, m)
    return partial_area(fpr, pro, max_fpr) / max_fpr


def pixel_metrics(
    maps: torch.Tensor,
    masks: torch.Tensor,
    threshold: float | None,
    max_fpr: float = 0.3,
) -> dict[str, float | None]:
    """Pixel AUROC, AUPRO up to ``max_fpr`` and F1 at the deployed pixel ``threshold``.

    Args:
        maps: ``(N, 1, H, W)`` raw anomaly maps.
        masks: ``(N, 1, H, W)`` ground truth (non-zero = defective).
        threshold: pixel threshold in raw map units (``map >= threshold`` is defective).
    """
    target = masks.flatten().bool()
    out: dict[str, float | None] = {"pixel_auroc": None, "pixel_aupro": None, "pixel_f1": None}
    if not both_classes(target.long(), "pixel metrics"):
        return out
    out["pixel_auroc"] = float(BinaryAUROC()(unit_interval(maps.flatten()), target.long()))
    out["pixel_aupro"] = aupro(maps, masks, max_fpr)
    if threshold is not None:
        pred = maps.flatten().double() >= threshold
        tp = int((pred & target).sum())
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (#predicted + #actual)
        out["pixel_f1"] = 2 * tp / max(1, int(pred.sum()) + int(target.sum()))
    return out
