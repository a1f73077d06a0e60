"""Held-out calibration state: decision thresholds and score normalisation, saved with the model.

Everything here is fitted on the held-out train/good slice (or a labeled validation folder),
never on test data, and lives in buffers so a checkpoint alone predicts the same labels anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from defectlab.errors import ConfigError

NORMALIZATIONS = ("none", "minmax", "threshold")
_NAN = float("nan")


class Calibration(nn.Module):
    """Thresholds and the affine score normalisation derived from held-out statistics.

    Normalisations (all increasing affine maps, so rankings and labels never change):
      - ``none``: raw scores.
      - ``minmax``: held-out good scores span [0, 1]; defects usually land above 1.
      - ``threshold``: held-out minimum -> 0 and the deployed threshold -> 1, so a normalised score
        above 1 means "defective" whatever the model's raw scale.

    Image scores and anomaly maps are normalised separately, each with its own statistics.

    Args:
        normalization: one of ``none``, ``minmax``, ``threshold`` (``eval.normalization``).
    """

    def __init__(self, normalization: str = "threshold") -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"eval.normalization={normalization}: choose one of {NORMALIZATIONS}")
        self.normalization = normalization
        for level in ("image", "pixel"):
            for stat in ("threshold", "min", "max"):
                self.register_buffer(f"{level}_{stat}", torch.tensor(_NAN, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        """True once thresholds were set (by calibration or a loaded checkpoint)."""
        return not bool(torch.isnan(self.image_threshold))

    def fit(
        self,
        image_threshold: float,
        pixel_threshold: float,
        good_scores: torch.Tensor,
        good_maps_min: float,
        good_maps_max: float,
    ) -> None:
        """Store thresholds (raw units) and held-out good statistics for normalisation."""
        self.image_threshold.fill_(image_threshold)
        self.pixel_threshold.fill_(pixel_threshold)
        self.image_min.fill_(float(good_scores.min()))
        self.image_max.fill_(float(good_scores.max()))
        self.pixel_min.fill_(good_maps_min)
        self.pixel_max.fill_(good_maps_max)

    def affine(self, level: str) -> tuple[float, float]:
        """``(shift, scale)`` of the ``image`` or ``pixel`` normalisation: ``(x - shift) / scale``."""
        lo, hi, thr = (float(getattr(self, f"{level}_{s}")) for s in ("min", "max", "threshold"))
        if self.normalization == "none":
            return 0.0, 1.0
        span = (hi if self.normalization == "minmax" else thr) - lo
        # A degenerate held-out set (all scores equal) keeps the raw scale rather than divide by 0.
        return lo, span if span > 0 else 1.0

    def normalize_score(self, score: torch.Tensor) -> torch.Tensor:
        """Normalised image scores ``(B,)`` (float64)."""
        shift, scale = self.affine("image")
        return (score.double() - shift) / scale

    def normalize_map(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Normalised anomaly maps ``(B, 1, H, W)`` (float32)."""
        shift, scale = self.affine("pixel")
        return (anomaly_map - shift) / scale

    def is_defective(self, score: torch.Tensor) -> torch.Tensor:
        """Image decisions ``(B,)`` bool, taken on raw scores (no rounding through normalisation)."""
        # Python floats, so maps and scores may sit on any device.
        return score.double() >= float(self.image_threshold)

    def segment(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Binary defect masks ``(B, 1, H, W)`` bool at the pixel threshold."""
        return anomaly_map.double() >= float(self.pixel_threshold)

    def as_dict(self) -> dict[str, float | str | None]:
        """Thresholds, statistics and their normalised values, for results.json."""
        out: dict[str, float | str | None] = {"normalization": self.normalization}
        for level in ("image", "pixel"):
            for stat in ("threshold", "min", "max"):
                value = float(getattr(self, f"{level}_{stat}"))
                out[f"{level}_{stat}"] = None if value != value else value
        if self.fitted:
            out["image_threshold_normalized"] = float(
                self.normalize_score(self.image_threshold.reshape(1))[0]
            )
            out["pixel_threshold_normalized"] = float(
                self.normalize_map(self.pixel_threshold.reshape(1))[0]
            )
        return out

    def get_extra_state(self) -> dict[str, str]:
        return {"normalization": self.normalization}

    def set_extra_state(self, state: dict[str, str]) -> None:
        # The checkpoint's choice wins: its scores must come out exactly as they were saved.
        self.normalization = state["normalization"]

    def extra_repr(self) -> str:
        return f"normalization={self.normalization}"
