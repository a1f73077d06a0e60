"""The typed batch: what the DataModule yields and the systems' steps take."""

from __future__ import annotations

from typing import NotRequired, TypedDict

import torch


class Item(TypedDict):
    """One sample of :class:`~defectlab.data.AnomalyDataset` before collation."""

    image: torch.Tensor  # (3, H, W) float in [0, 1]
    label: int  # 0 good / 1 defective
    mask: NotRequired[torch.Tensor]  # (1, H, W) uint8; only when the category has masks
    defect_type: str  # folder name; "good" for defect-free images
    path: str


class Batch(TypedDict):
    """A collated batch of :class:`Item` (train, validation and test loaders alike)."""

    image: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    label: torch.Tensor  # (B,) 0 good / 1 defective
    mask: NotRequired[torch.Tensor]  # (B, 1, H, W) uint8; only when the category has masks
    defect_type: list[str]
    path: list[str]


class ImageBatch(TypedDict):
    """What deployment scores (``predict_step``): images and where they came from."""

    image: torch.Tensor  # (B, 3, H, W) float in [0, 1]
    path: list[str] | None
