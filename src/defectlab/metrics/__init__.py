"""Metrics (torchmetrics where it has them), AUPRO, bootstrap CIs and held-out thresholds."""

from defectlab.metrics.image import (
    bootstrap_auroc,
    image_metrics,
    oracle_f1,
    stratified_resamples,
    unit_interval,
)
from defectlab.metrics.pixel import aupro, pixel_metrics, pro_curve
from defectlab.metrics.summary import summarize
from defectlab.metrics.thresholds import (
    ThresholdSpec,
    best_f1_threshold,
    good_threshold,
    image_threshold,
    pixel_threshold,
)

__all__ = [
    "ThresholdSpec",
    "aupro",
    "best_f1_threshold",
    "bootstrap_auroc",
    "good_threshold",
    "image_metrics",
    "image_threshold",
    "oracle_f1",
    "pixel_metrics",
    "pixel_threshold",
    "pro_curve",
    "stratified_resamples",
    "summarize",
    "unit_interval",
]
