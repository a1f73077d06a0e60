"""Image- and pixel-level metrics (torchmetrics) and threshold calibration on held-out good data."""

from __future__ import annotations

import warnings

import torch
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryPrecisionRecallCurve,
    BinaryRecall,
)

from defectlab.errors import ConfigError

THRESHOLD_STRATEGIES = ("percentile", "sigma", "fixed")


def calibrate_threshold(
    good_scores: torch.Tensor,
    strategy: str = "percentile",
    percentile: float = 99.0,
    n_sigma: float = 3.0,
    value: float | None = None,
) -> float:
    """Decision threshold from scores of held-out good images (never test images).

    Args:
        good_scores: ``(N,)`` scores of held-out defect-free images.
        strategy: ``percentile`` (that percentile of good scores), ``sigma`` (mean + n_sigma * std)
            or ``fixed`` (``value``).
    """
    if strategy == "fixed":
        if value is None:
            raise ConfigError("eval.threshold.value must be set when eval.threshold.strategy=fixed")
        return float(value)
    if strategy not in THRESHOLD_STRATEGIES:
        raise ConfigError(
            f"eval.threshold.strategy={strategy}: choose one of {THRESHOLD_STRATEGIES}"
        )
    if good_scores.numel() == 0:
        raise ConfigError(
            f"eval.threshold.strategy={strategy} needs held-out good images: set data.val_ratio > 0"
        )
    scores = good_scores.double().flatten()
    if strategy == "percentile":
        if not 0 <= percentile <= 100:
            raise ConfigError(f"eval.threshold.percentile must be in [0, 100], got {percentile}")
        return float(torch.quantile(scores, percentile / 100.0))
    std = scores.std() if scores.numel() > 1 else torch.zeros(())
    return float(scores.mean() + n_sigma * std)


def _unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] in float64: order-preserving, so AUROC/PR are unchanged.

    torchmetrics treats float inputs outside [0, 1] as logits and applies a sigmoid, which
    saturates raw distances (e.g. all PatchCore scores ~100 -> 1.0) and destroys the ranking.
    """
    scores = scores.double()
    lo, hi = scores.min(), scores.max()
    return (scores - lo) / (hi - lo) if hi > lo else torch.zeros_like(scores)


def _both_classes(labels: torch.Tensor, what: str) -> bool:
    if labels.min() == labels.max():
        warnings.warn(
            f"{what}: test set has only one class, metrics needing both are undefined", stacklevel=3
        )
        return False
    return True


def image_metrics(
    scores: torch.Tensor, labels: torch.Tensor, threshold: float | None
) -> dict[str, float | None]:
    """AUROC, F1/precision/recall at the deployed threshold and the oracle F1-max.

    ``image_f1_max`` picks its threshold on the test labels: an optimistic upper bound, reported
    only for comparison with papers, never as the deployed performance.
    """
    scores, labels = scores.float().flatten(), labels.long().flatten()
    out: dict[str, float | None] = {"image_auroc": None, "image_f1_max": None}
    if _both_classes(labels, "image metrics"):
        unit = _unit_interval(scores)
        out["image_auroc"] = float(BinaryAUROC()(unit, labels))
        p, r, _ = BinaryPrecisionRecallCurve()(unit, labels)
        out["image_f1_max"] = float((2 * p * r / (p + r).clamp_min(1e-12)).max())
    if threshold is None:
        out.update(image_f1=None, image_precision=None, image_recall=None)
        return out
    # Binary predictions, not raw scores: torchmetrics would squash scores outside [0, 1].
    pred = (scores >= threshold).long()
    out["image_f1"] = float(BinaryF1Score()(pred, labels))
    out["image_precision"] = float(BinaryPrecision()(pred, labels))
    out["image_recall"] = float(BinaryRecall()(pred, labels))
    return out


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float | None]:
    """Pixel AUROC over all test pixels; ``maps`` and ``masks`` are ``(N, 1, H, W)``."""
    target = masks.long().flatten()
    if not _both_classes(target, "pixel metrics"):
        return {"pixel_auroc": None}
    return {"pixel_auroc": float(BinaryAUROC()(_unit_interval(maps.flatten()), target))}
