"""MVTec-AD-layout data: folder layout, splits, transforms and the one DataModule every model shares.

``layout`` scans the folders (also for the dataset report and defect-type classification),
``splits`` holds the seeded held-out and labeled-defect splits, ``transforms`` the pre-processing
shared by training, inference and export, ``datamodule`` the dataset and the DataModule,
``batch`` the typed batch they yield.
"""

from defectlab.data.batch import Batch, ImageBatch, Item
from defectlab.data.datamodule import BAD_FILE_POLICIES, AnomalyDataModule, AnomalyDataset
from defectlab.data.layout import (
    GOOD,
    IMAGE_EXTENSIONS,
    MASK_SUFFIX,
    CategoryIndex,
    Sample,
    check_no_overlap,
    check_samples,
    images_in,
    mask_path,
    orphan_masks,
    scan_category,
    scan_labeled,
    split_folders,
)
from defectlab.imageio import load_image  # decoding rules of every reader of these folders
from defectlab.data.splits import check_val_ratio, split_holdout, take_labeled
from defectlab.data.transforms import build_transform, image_tensor, preprocess_uint8

__all__ = [
    "BAD_FILE_POLICIES",
    "GOOD",
    "IMAGE_EXTENSIONS",
    "MASK_SUFFIX",
    "AnomalyDataModule",
    "AnomalyDataset",
    "Batch",
    "CategoryIndex",
    "ImageBatch",
    "Item",
    "Sample",
    "build_transform",
    "check_no_overlap",
    "check_samples",
    "check_val_ratio",
    "image_tensor",
    "images_in",
    "load_image",
    "mask_path",
    "orphan_masks",
    "preprocess_uint8",
    "scan_category",
    "scan_labeled",
    "split_folders",
    "split_holdout",
    "take_labeled",
]
