"""Seeded splits: the held-out slice of train/good, and real defects moved into training."""

from __future__ import annotations

import random

from defectlab.data.layout import Sample
from defectlab.errors import ConfigError, DataError


def check_val_ratio(val_ratio: float) -> None:
    """Raise ConfigError unless ``0 <= val_ratio < 1``."""
    if not 0 <= val_ratio < 1:
        raise ConfigError(f"data.val_ratio must be in [0, 1), got {val_ratio}")


def split_holdout(
    samples: list[Sample], val_ratio: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of train/good into (fit, held-out) lists; held-out is used for calibration only."""
    check_val_ratio(val_ratio)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = round(val_ratio * len(samples))
    if val_ratio > 0:
        n_val = max(1, n_val)
    if n_val >= len(samples):
        raise DataError(
            f"only {len(samples)} training images: too few to hold out data.val_ratio={val_ratio}"
        )
    val = sorted((samples[i] for i in order[:n_val]), key=lambda s: s.path)
    fit = sorted((samples[i] for i in order[n_val:]), key=lambda s: s.path)
    return fit, val


def take_labeled(test: list[Sample], per_type: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Move ``per_type`` seeded-random defective images of every defect type out of ``test``.

    Returns ``(moved, remaining_test)``. At least one image of each type stays in the test set.
    """
    by_type: dict[str, list[Sample]] = {}
    for s in test:
        if s.label == 1:
            by_type.setdefault(s.defect_type, []).append(s)
    moved: list[Sample] = []
    rng = random.Random(seed)
    for defect_type, samples in sorted(by_type.items()):
        if per_type >= len(samples):
            raise DataError(
                f"data.labeled_anomalies={per_type} but test/{defect_type} has only "
                f"{len(samples)} images; at least one per type must stay in the test set"
            )
        moved.extend(rng.sample(samples, per_type))
    chosen = {s.path for s in moved}
    return moved, [s for s in test if s.path not in chosen]
