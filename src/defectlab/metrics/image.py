"""Image-level metrics (torchmetrics) and a stratified bootstrap confidence interval for AUROC."""

from __future__ import annotations

import warnings

import torch
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryConfusionMatrix,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from defectlab.metrics.thresholds import best_f1_threshold


def unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] in float64: order-preserving, so ranking metrics are unchanged.

    torchmetrics treats float inputs outside [0, 1] as logits and applies a sigmoid, which
    saturates raw distances (e.g. all PatchCore scores ~100 -> 1.0) and destroys the ranking.
    The scaling uses the scores being ranked only; it never feeds a threshold.
    """
    scores = scores.double()
    lo, hi = scores.min(), scores.max()
    return (scores - lo) / (hi - lo) if hi > lo else torch.zeros_like(scores)


def both_classes(labels: torch.Tensor, what: str) -> bool:
    """True when ``labels`` hold 0s and 1s; otherwise warn that ranking metrics are undefined."""
    if labels.numel() == 0 or labels.min() == labels.max():
        warnings.warn(
            f"{what}: only one class present, metrics needing both are undefined", stacklevel=3
        )
        return False
    return True


def image_metrics(
    scores: torch.Tensor, labels: torch.Tensor, threshold: float | None
) -> dict[str, float | int | None]:
    """AUROC, AUPR, and F1/precision/recall/confusion counts at the deployed ``threshold``.

    Args:
        scores: ``(N,)`` raw image scores (higher = more anomalous).
        labels: ``(N,)`` 0 good / 1 defective.
        threshold: deployed decision threshold in raw score units (``score >= threshold``).
    """
    scores, labels = scores.flatten(), labels.long().flatten()
    out: dict[str, float | int | None] = {"image_auroc": None, "image_aupr": None}
    if both_classes(labels, "image metrics"):
        unit = unit_interval(scores)
        out["image_auroc"] = float(BinaryAUROC()(unit, labels))
        out["image_aupr"] = float(BinaryAveragePrecision()(unit, labels))
    keys = ("image_f1", "image_precision", "image_recall", "tn", "fp", "fn", "tp")
    if threshold is None:
        return out | dict.fromkeys(keys)
    # Binary predictions, not raw scores: torchmetrics would squash scores outside [0, 1].
    pred = (scores.double() >= threshold).long()
    (tn, fp), (fn, tp) = BinaryConfusionMatrix()(pred, labels).tolist()
    out["image_f1"] = float(BinaryF1Score(zero_division=0)(pred, labels))
    out["image_precision"] = float(BinaryPrecision(zero_division=0)(pred, labels))
    out["image_recall"] = float(BinaryRecall(zero_division=0)(pred, labels))
    return out | {"tn": tn, "fp": fp, "fn": fn, "tp": tp}


def oracle_f1(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """F1-max: the best F1 over thresholds chosen *on the test labels* (an optimistic bound)."""
    if not both_classes(labels.flatten(), "oracle F1"):
        return {"image_f1_max": None, "image_f1_max_threshold": None}
    threshold, f1 = best_f1_threshold(scores, labels)
    return {"image_f1_max": f1, "image_f1_max_threshold": threshold}


def stratified_resamples(
    labels: torch.Tensor, n_resamples: int, generator: torch.Generator
) -> torch.Tensor:
    """``(n_resamples, N)`` indices drawn with replacement within each class (class sizes kept)."""
    labels = labels.flatten()
    columns = []
    for cls in (0, 1):
        idx = torch.nonzero(labels == cls).flatten()
        pick = torch.randint(len(idx), (n_resamples, len(idx)), generator=generator)
        columns.append(idx[pick])
    return torch.cat(columns, dim=1)


def bootstrap_auroc(
    scores: torch.Tensor,
    labels: torch.Tensor,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of image AUROC, resampling good and defective separately.

    Stratified so every resample keeps both classes (torchmetrics' BootStrapper resamples without
    strata, and deep-copies the metric per resample). Each resample's AUROC is the Mann-Whitney
    statistic with multiplicity weights, so all resamples come from one matrix product over the
    pairwise comparison matrix instead of a sort per resample.
    """
    labels = labels.long().flatten()
    if n_resamples <= 0 or not both_classes(labels, "bootstrap AUROC"):
        return None
    if not 0 < confidence < 1:
        raise ValueError(f"eval.bootstrap.confidence must be in (0, 1), got {confidence}")
    scores = scores.double().flatten()
    pos, neg = torch.nonzero(labels == 1).flatten(), torch.nonzero(labels == 0).flatten()
    # wins[i, j] = 1 if defective i outranks good j, 0.5 on ties: the AUROC summand.
    diff = scores[pos][:, None] - scores[neg][None, :]
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    generator = torch.Generator().manual_seed(seed)
    idx = stratified_resamples(labels, n_resamples, generator)
    # Map global indices back to positions within each class to count multiplicities.
    pos_rank = torch.full((len(labels),), -1, dtype=torch.long)
    pos_rank[pos] = torch.arange(len(pos))
    neg_rank = torch.full((len(labels),), -1, dtype=torch.long)
    neg_rank[neg] = torch.arange(len(neg))
    n_neg = len(neg)
    w_neg = _counts(neg_rank[idx[:, :n_neg]], len(neg))
    w_pos = _counts(pos_rank[idx[:, n_neg:]], len(pos))
    aurocs = ((w_pos @ wins) * w_neg).sum(1) / (len(pos) * len(neg))
    alpha = (1 - confidence) / 2
    lo, hi = torch.quantile(aurocs, torch.tensor([alpha, 1 - alpha], dtype=aurocs.dtype))
    return float(lo), float(hi)


def _counts(rows: torch.Tensor, size: int) -> torch.Tensor:
    """Per-row multiplicity of each index in ``[0, size)``: ``(R, size)`` float64."""
    counts = torch.zeros(rows.shape[0], size, dtype=torch.float64)
    counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=torch.float64))
    return counts
