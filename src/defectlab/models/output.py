"""The one result type every model's ``predict`` returns."""

from dataclasses import dataclass

import torch


@dataclass
class AnomalyOutput:
    """Per-image anomaly score ``(B,)`` and anomaly map ``(B, 1, H, W)`` (higher = more anomalous)."""

    score: torch.Tensor
    anomaly_map: torch.Tensor


def predict_in_slices(model, images: torch.Tensor, step: int | None) -> AnomalyOutput:
    """``model.predict`` over ``images`` in slices of ``step`` (bounds activation memory).

    Every image is scored on its own, so slicing changes nothing but the peak memory.
    """
    if not step or len(images) <= step:
        return model.predict(images)
    outs = [model.predict(part) for part in images.split(step)]
    return AnomalyOutput(
        score=torch.cat([o.score for o in outs]),
        anomaly_map=torch.cat([o.anomaly_map for o in outs]),
    )
