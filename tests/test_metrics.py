"""Metrics against independent references: scikit-learn, and a slow, literal AUPRO."""

import itertools
from collections import deque

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from defectlab.errors import ConfigError
from defectlab.metrics import (
    ThresholdSpec,
    aupro,
    best_f1_threshold,
    bootstrap_auroc,
    image_metrics,
    image_threshold,
    pixel_metrics,
    pixel_threshold,
    stratified_resamples,
    summarize,
)


def _random_case(seed, n=120, ties=False):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.4).long()
    labels[:2] = torch.tensor([0, 1])
    scores = 100 + 5 * torch.randn(n, generator=g) + 4 * labels  # raw distances, far outside [0, 1]
    if ties:
        scores = scores.round()
    return scores, labels


@pytest.mark.parametrize(("seed", "ties"), [(0, False), (1, True), (2, True)])
def test_image_metrics_match_sklearn(seed, ties):
    scores, labels = _random_case(seed, ties=ties)
    threshold = float(scores.median())
    out = image_metrics(scores, labels, threshold)
    s, y = scores.double().numpy(), labels.numpy()
    pred = (s >= threshold).astype(int)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert out["image_aupr"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert out["image_f1"] == pytest.approx(f1_score(y, pred), abs=1e-6)
    assert out["image_precision"] == pytest.approx(precision_score(y, pred), abs=1e-6)
    assert out["image_recall"] == pytest.approx(recall_score(y, pred), abs=1e-6)
    (tn, fp), (fn, tp) = confusion_matrix(y, pred)
    assert (out["tn"], out["fp"], out["fn"], out["tp"]) == (tn, fp, fn, tp)


@pytest.mark.parametrize(("seed", "ties"), [(3, False), (4, True)])
def test_best_f1_threshold_matches_sklearn_pr_curve(seed, ties):
    scores, labels = _random_case(seed, ties=ties)
    threshold, f1 = best_f1_threshold(scores, labels)
    p, r, thr = precision_recall_curve(labels.numpy(), scores.double().numpy())
    f1s = 2 * p * r / np.maximum(p + r, 1e-12)
    assert f1 == pytest.approx(f1s.max(), abs=1e-9)
    assert threshold == pytest.approx(thr[np.argmax(f1s[:-1])])
    # The returned threshold achieves the returned F1 under the deployed rule score >= t.
    pred = (scores.double() >= threshold).long()
    assert f1_score(labels.numpy(), pred.numpy()) == pytest.approx(f1)


def test_f1_precision_recall_at_threshold_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    out = image_metrics(scores, labels, threshold=3.5)  # flags 4, 5, 6: TP=2, FP=1, FN=1
    assert out["image_precision"] == out["image_recall"] == out["image_f1"] == pytest.approx(2 / 3)
    assert best_f1_threshold(scores, labels) == (3.0, pytest.approx(6 / 7))  # TP=3, FP=1


def test_single_class_is_undefined_not_a_number():
    with pytest.warns(UserWarning, match="only one class"):
        out = image_metrics(torch.rand(5), torch.zeros(5, dtype=torch.long), threshold=0.5)
    assert out["image_auroc"] is None and out["image_aupr"] is None


def test_bootstrap_interval_is_the_quantile_of_resampled_aurocs():
    scores, labels = _random_case(5, n=60, ties=True)
    lo, hi = bootstrap_auroc(scores, labels, n_resamples=200, confidence=0.9, seed=7)
    # Recompute every resample with sklearn from the same seeded, stratified indices.
    idx = stratified_resamples(labels, 200, torch.Generator().manual_seed(7))
    assert (labels[idx].sum(1) == labels.sum()).all()  # class sizes are kept
    ref = np.array([roc_auc_score(labels[i].numpy(), scores[i].double().numpy()) for i in idx])
    assert lo == pytest.approx(np.quantile(ref, 0.05), abs=1e-9)
    assert hi == pytest.approx(np.quantile(ref, 0.95), abs=1e-9)
    assert lo < roc_auc_score(labels.numpy(), scores.numpy()) < hi
    assert bootstrap_auroc(scores, labels, n_resamples=200, confidence=0.9, seed=7) == (lo, hi)
    assert bootstrap_auroc(scores, labels, n_resamples=0) is None


# -- AUPRO ------------------------------------------------------------------------------------


def _regions(mask):
    """8-connected regions by breadth-first flood fill: a list of pixel sets."""
    seen, regions = np.zeros_like(mask, dtype=bool), []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        region, queue = set(), deque([start])
        seen[start] = True
        while queue:
            r, c = queue.popleft()
            region.add((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    q = (r + dr, c + dc)
                    inside = 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1]
                    if inside and mask[q] and not seen[q]:
                        seen[q] = True
                        queue.append(q)
        regions.append(region)
    return regions


def _aupro_reference(maps, masks, max_fpr=0.3):
    """Threshold by threshold: FPR over normal pixels, PRO = mean over regions of their overlap."""
    regions = [(i, reg) for i, m in enumerate(masks) for reg in _regions(m)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([sum(pred[i][p] for p in reg) / len(reg) for i, reg in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # cut the last segment at max_fpr
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def test_aupro_by_hand_weights_regions_not_pixels():
    # Two regions in one image: A (2 px, scores 0.9 and 0.5) and B (1 px, 0.8).
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], dtype=bool)
    amap = np.full(mask.shape, 0.1)
    amap[0, 0], amap[0, 1], amap[2, 3], amap[1, 2] = 0.9, 0.5, 0.8, 0.7  # (1, 2) is normal
    # Curve: (0, .25) (0, .75) (1/9, .75) (1/9, 1) (1, 1) -> area to 0.3 = .75/9 + (.3 - 1/9)
    expected = (0.75 / 9 + 0.3 - 1 / 9) / 0.3
    got = aupro(torch.from_numpy(amap)[None, None], torch.from_numpy(mask)[None, None])
    assert got == pytest.approx(expected, abs=1e-12)
    assert _aupro_reference(amap[None], mask[None]) == pytest.approx(expected, abs=1e-12)
    # A perfect map scores 1 however small the regions are.
    assert aupro(torch.from_numpy(mask.astype(float))[None], torch.from_numpy(mask)[None]) == 1.0


def test_aupro_diagonal_pixels_form_one_region():
    mask = np.eye(4, dtype=bool)  # 8-connected: one region of 4 pixels
    amap = np.zeros((4, 4))
    amap[0, 0] = 1.0  # one of four pixels found before any false positive
    # PRO jumps to 1/4 at FPR 0, then to 1 together with all 12 normal pixels (FPR 1).
    # Area to 0.3: trapezoid from (0, 1/4) towards (1, 1), cut at 0.3.
    y_at = 0.25 + 0.75 * 0.3
    expected = 0.3 * (0.25 + y_at) / 2 / 0.3
    got = aupro(torch.from_numpy(amap)[None], torch.from_numpy(mask)[None])
    assert got == pytest.approx(expected)
    assert _aupro_reference(amap[None], mask[None]) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_slow_reference_on_random_multi_region_maps(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), dtype=bool)
    for img in masks[:2]:  # the third image is defect-free
        for _ in range(3):  # several (possibly touching) rectangles per image
            r, c = rng.integers(0, 10, 2)
            img[r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = True
    maps = rng.random(masks.shape) + 0.6 * masks
    maps = np.round(maps, 1)  # ties across normal and defective pixels
    for max_fpr in (0.3, 0.05, 1.0):
        got = aupro(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None], max_fpr)
        assert got == pytest.approx(_aupro_reference(maps, masks, max_fpr), abs=1e-9)


def test_pixel_metrics_match_sklearn():
    g = torch.Generator().manual_seed(1)
    masks = (torch.rand(3, 1, 16, 16, generator=g) < 0.2).to(torch.uint8)
    maps = torch.rand(3, 1, 16, 16, generator=g) * 50 + masks * 20
    out = pixel_metrics(maps, masks, threshold=45.0)
    y, s = masks.flatten().numpy(), maps.flatten().double().numpy()
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert out["pixel_f1"] == pytest.approx(f1_score(y, s >= 45.0), abs=1e-9)
    assert out["pixel_aupro"] == pytest.approx(
        _aupro_reference(maps[:, 0].double().numpy(), masks[:, 0].bool().numpy()), abs=1e-9
    )


# -- thresholds -------------------------------------------------------------------------------


def test_threshold_strategies():
    good = torch.arange(101, dtype=torch.float32)
    assert image_threshold(ThresholdSpec("percentile", percentile=95), good) == pytest.approx(95)
    assert image_threshold(ThresholdSpec("sigma", n_sigma=2), good) == pytest.approx(
        50 + 2 * good.std().item(), rel=1e-6
    )
    assert image_threshold(ThresholdSpec("fixed", value=7.5), good) == 7.5
    val_scores, val_labels = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 1, 1])
    f1_val = ThresholdSpec("f1_val", percentile=50)
    assert image_threshold(f1_val, good, val_scores, val_labels) == 3.0
    # Pixel thresholds: the same rule on per-image map maxima; f1_val without masks falls back.
    assert pixel_threshold(ThresholdSpec("percentile", percentile=95), good) == pytest.approx(95)
    assert pixel_threshold(f1_val, good) == pytest.approx(50)
    assert pixel_threshold(ThresholdSpec("fixed", value=7.5), good) == 7.5
    assert pixel_threshold(ThresholdSpec("fixed", value=7.5, pixel_value=2.0), good) == 2.0


def test_threshold_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="threshold.strategy=oracle"):
        ThresholdSpec("oracle")
    with pytest.raises(ConfigError, match="threshold.value"):
        ThresholdSpec("fixed")
    with pytest.raises(ConfigError, match="threshold.percentile"):
        ThresholdSpec(percentile=120)
    with pytest.raises(ConfigError, match="data.val_ratio"):
        image_threshold(ThresholdSpec(), torch.empty(0))
    with pytest.raises(ConfigError, match="data.val_dir"):
        image_threshold(ThresholdSpec("f1_val"), torch.ones(3))


# -- summary ----------------------------------------------------------------------------------


def test_summary_reports_every_defect_type_against_all_good_images():
    scores, labels = _random_case(6, n=90)
    types = ["good" if y == 0 else ("scratch" if i % 2 else "hole") for i, y in enumerate(labels)]
    out = summarize(scores, labels, types, image_threshold=100.0, bootstrap={"n_resamples": 50})
    assert set(out) == {"metrics", "confusion_matrix", "oracle", "per_defect_type"}
    assert set(out["per_defect_type"]) == {"good", "hole", "scratch"}
    good = torch.tensor([t == "good" for t in types])
    for name in ("hole", "scratch"):
        keep = good | torch.tensor([t == name for t in types])
        row = out["per_defect_type"][name]
        assert row["n"] == sum(t == name for t in types)
        assert row["image_auroc"] == pytest.approx(
            roc_auc_score(labels[keep].numpy(), scores[keep].numpy()), abs=1e-6
        )
        assert row["detected"] == int(((scores >= 100.0) & keep & ~good).sum())
        assert row["image_auroc_ci_low"] <= row["image_auroc"] <= row["image_auroc_ci_high"]
    cm = out["confusion_matrix"]
    assert out["per_defect_type"]["good"]["false_positive_rate"] == cm["fp"] / int(good.sum())
    assert "image_f1_max" not in out["metrics"] and out["oracle"]["image_f1_max"] is not None
    assert all(isinstance(v, float | None) for v in out["metrics"].values())
