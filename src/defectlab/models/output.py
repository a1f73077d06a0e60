"""The one result type every model's ``predict`` returns."""

from dataclasses import dataclass

import torch


@dataclass
class AnomalyOutput:
    """Per-image anomaly score ``(B,)`` and anomaly map ``(B, 1, H, W)`` (higher = more anomalous)."""

    score: torch.Tensor
    anomaly_map: torch.Tensor
