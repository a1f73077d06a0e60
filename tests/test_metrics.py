"""Metrics against independent references; thresholds from held-out scores only."""

import pytest
import torch

from defectlab.errors import ConfigError
from defectlab.metrics import calibrate_threshold, image_metrics, pixel_metrics


def _auroc_reference(scores, labels):
    """Mann-Whitney U: probability that a defective score beats a good one (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def test_image_auroc_matches_reference_on_unbounded_scores():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, generator=g) < 0.4).long()
    scores = (
        100 + 5 * torch.randn(200, generator=g) + 3 * labels
    )  # raw distances, far outside [0, 1]
    out = image_metrics(scores, labels, threshold=None)
    assert out["image_auroc"] == pytest.approx(_auroc_reference(scores, labels), abs=1e-6)
    assert out["image_f1"] is None


def test_f1_precision_recall_at_threshold():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    out = image_metrics(
        scores, labels, threshold=3.5
    )  # predicts 4, 5, 6 defective: TP=2, FP=1, FN=1
    assert out["image_precision"] == pytest.approx(2 / 3)
    assert out["image_recall"] == pytest.approx(2 / 3)
    assert out["image_f1"] == pytest.approx(2 / 3)
    assert out["image_f1_max"] == pytest.approx(6 / 7)  # threshold 3 (oracle): TP=3, FP=1, FN=0


def test_pixel_auroc_matches_reference():
    g = torch.Generator().manual_seed(1)
    masks = (torch.rand(3, 1, 8, 8, generator=g) < 0.2).long()
    maps = torch.rand(3, 1, 8, 8, generator=g) * 50 + masks * 20
    assert pixel_metrics(maps, masks)["pixel_auroc"] == pytest.approx(
        _auroc_reference(maps.flatten(), masks.flatten()), abs=1e-6
    )


def test_single_class_is_undefined_not_a_number():
    with pytest.warns(UserWarning, match="only one class"):
        out = image_metrics(torch.rand(5), torch.zeros(5, dtype=torch.long), threshold=0.5)
    assert out["image_auroc"] is None


def test_threshold_strategies():
    good = torch.arange(101, dtype=torch.float32)
    assert calibrate_threshold(good, "percentile", percentile=95) == pytest.approx(95.0)
    assert calibrate_threshold(good, "sigma", n_sigma=2) == pytest.approx(
        50 + 2 * good.std().item(), rel=1e-6
    )
    assert calibrate_threshold(good, "fixed", value=7.5) == 7.5
    with pytest.raises(ConfigError, match="eval.threshold.strategy"):
        calibrate_threshold(good, "oracle")
    with pytest.raises(ConfigError, match="data.val_ratio"):
        calibrate_threshold(torch.empty(0), "percentile")
