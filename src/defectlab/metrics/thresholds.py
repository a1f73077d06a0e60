"""Decision thresholds, fitted on data the model never trained on and that is not the test set.

Image thresholds come from held-out train/good scores (``percentile``, ``sigma``), a ``fixed``
value, or the F1-best threshold on a user-supplied labeled validation folder (``f1_val``). Pixel
thresholds apply the same rule to the per-image maximum of the held-out anomaly maps: a pixel is
defective when it exceeds what the hottest pixel of a good image typically reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defectlab.errors import ConfigError

STRATEGIES = ("percentile", "sigma", "fixed", "f1_val")


@dataclass(frozen=True)
class ThresholdSpec:
    """The ``threshold`` config group; field names are its YAML keys."""

    strategy: str = "percentile"
    percentile: float = 99.0
    n_sigma: float = 3.0
    value: float | None = None
    pixel_value: float | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"threshold.strategy={self.strategy}: choose one of {STRATEGIES} (threshold=<name>)"
            )
        if not 0 <= self.percentile <= 100:
            raise ConfigError(f"threshold.percentile must be in [0, 100], got {self.percentile}")
        if self.strategy == "fixed" and self.value is None:
            raise ConfigError("threshold=fixed needs threshold.value=<image score threshold>")


def good_threshold(good: torch.Tensor, spec: ThresholdSpec) -> float:
    """``percentile`` or ``mean + n_sigma * std`` of ``(N,)`` statistics of held-out good images.

    ``fixed`` and ``f1_val`` fall back to the percentile rule here (used for pixel thresholds).
    """
    if good.numel() == 0:
        raise ConfigError(
            f"threshold={spec.strategy} needs held-out good images: set data.val_ratio > 0"
        )
    good = good.double().flatten()
    if spec.strategy == "sigma":
        std = good.std() if good.numel() > 1 else torch.zeros((), dtype=good.dtype)
        return float(good.mean() + spec.n_sigma * std)
    return float(torch.quantile(good, spec.percentile / 100.0))


def best_f1_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The threshold ``t`` (a score value; predict ``score >= t``) with the highest F1, and that F1.

    Written out rather than read off torchmetrics' PR curve because the threshold is needed in raw
    score units, and torchmetrics rescales scores outside [0, 1].
    """
    scores, labels = scores.double().flatten(), labels.flatten().bool()
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("F1 needs at least one defective sample")
    order = torch.argsort(scores, descending=True)
    s, y = scores[order], labels[order]
    tp = torch.cumsum(y, 0).double()
    fp = torch.cumsum(~y, 0).double()
    # Equal scores share one decision: keep only the last position of each run of ties.
    last = torch.ones_like(y)
    last[:-1] = s[1:] != s[:-1]
    tp, fp, s = tp[last], fp[last], s[last]
    f1 = 2 * tp / (tp + fp + n_pos)  # 2TP / (2TP + FP + FN) with FN = n_pos - TP
    best = int(torch.argmax(f1))
    return float(s[best]), float(f1[best])


def image_threshold(
    spec: ThresholdSpec,
    good_scores: torch.Tensor,
    val_scores: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
) -> float:
    """Image-score threshold for ``spec`` from held-out good scores or the labeled folder."""
    if spec.strategy == "fixed":
        return float(spec.value)
    if spec.strategy == "f1_val":
        _require_labeled(val_labels)
        return best_f1_threshold(val_scores, val_labels)[0]
    return good_threshold(good_scores, spec)


def pixel_threshold(
    spec: ThresholdSpec,
    good_map_max: torch.Tensor,
    val_maps: torch.Tensor | None = None,
    val_masks: torch.Tensor | None = None,
) -> float:
    """Anomaly-map threshold: same rule on per-image map maxima, or pixel F1 on labeled masks."""
    if spec.strategy == "fixed":
        return float(spec.value if spec.pixel_value is None else spec.pixel_value)
    if spec.strategy == "f1_val" and val_masks is not None and bool(val_masks.any()):
        return best_f1_threshold(val_maps, val_masks)[0]
    return good_threshold(good_map_max, spec)


def _require_labeled(labels: torch.Tensor | None) -> None:
    if labels is None or labels.numel() == 0:
        raise ConfigError(
            "threshold=f1_val needs a labeled validation folder: set data.val_dir=<folder with "
            "good/ and <defect_type>/ sub-folders>"
        )
    if labels.min() == labels.max():
        raise ConfigError("threshold=f1_val: data.val_dir must hold both good and defective images")
