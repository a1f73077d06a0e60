"""All metrics of one test run: overall, per defect type, oracle numbers kept apart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from defectlab.metrics.image import bootstrap_auroc, image_metrics, oracle_f1
from defectlab.metrics.pixel import pixel_metrics

GOOD = "good"
CONFUSION_KEYS = ("tn", "fp", "fn", "tp")


def _subset_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_threshold: float | None,
    maps: torch.Tensor | None,
    masks: torch.Tensor | None,
    pixel_threshold: float | None,
    max_fpr: float,
    bootstrap: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, int | None]]:
    image = image_metrics(scores, labels, image_threshold)
    confusion = {k: image.pop(k) for k in CONFUSION_KEYS}
    ci = bootstrap_auroc(scores, labels, **bootstrap) if bootstrap else None
    metrics = {
        "image_auroc": image.pop("image_auroc"),
        "image_auroc_ci_low": None if ci is None else ci[0],
        "image_auroc_ci_high": None if ci is None else ci[1],
        **image,
    }
    if maps is not None and masks is not None:
        metrics |= pixel_metrics(maps, masks, pixel_threshold, max_fpr)
    return metrics, confusion


def summarize(
    scores: torch.Tensor,
    labels: torch.Tensor,
    defect_types: list[str],
    image_threshold: float | None,
    maps: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    pixel_threshold: float | None = None,
    max_fpr: float = 0.3,
    bootstrap: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every metric of a test run, overall and for each defect type (its images + all good ones).

    Args:
        scores: ``(N,)`` raw image scores.
        labels: ``(N,)`` 0 good / 1 defective.
        defect_types: ``N`` folder names (``good`` for defect-free images).
        image_threshold: deployed image threshold in raw units (held-out calibrated).
        maps: ``(N, 1, H, W)`` anomaly maps, when the data have ground-truth masks.
        masks: ``(N, 1, H, W)`` ground-truth masks, with ``maps``.
        pixel_threshold: deployed pixel threshold in raw units (held-out calibrated).
        max_fpr: FPR limit of AUPRO (``eval.max_fpr``).
        bootstrap: ``eval.bootstrap`` (``n_resamples``, ``confidence``, ``seed``); None = no CI.

    Returns:
        ``metrics`` (scalars: what is deployed or threshold-free), ``confusion_matrix``, ``oracle``
        (numbers whose threshold was picked on the test labels) and ``per_defect_type``.
    """
    labels = labels.long()
    common = {
        "image_threshold": image_threshold,
        "pixel_threshold": pixel_threshold,
        "max_fpr": max_fpr,
        "bootstrap": bootstrap,
    }
    metrics, confusion = _subset_metrics(scores, labels, maps=maps, masks=masks, **common)
    per_type: dict[str, dict[str, Any]] = {}
    is_good = torch.tensor([t == GOOD for t in defect_types])
    n_good = int(is_good.sum())
    if n_good:
        per_type[GOOD] = {
            "n": n_good,
            "false_positive_rate": None
            if confusion["fp"] is None
            else confusion["fp"] / max(1, confusion["fp"] + confusion["tn"]),
        }
    for defect_type in sorted({t for t in defect_types if t != GOOD}):
        keep = is_good | torch.tensor([t == defect_type for t in defect_types])
        sub_maps = None if maps is None else maps[keep]
        sub_masks = None if masks is None else masks[keep]
        sub, sub_confusion = _subset_metrics(
            scores[keep], labels[keep], maps=sub_maps, masks=sub_masks, **common
        )
        n = int(keep.sum()) - n_good
        per_type[defect_type] = {"n": n, **sub, "detected": sub_confusion["tp"]}
    return {
        "metrics": metrics,
        "confusion_matrix": confusion,
        "oracle": oracle_f1(scores, labels),
        "per_defect_type": per_type,
    }
