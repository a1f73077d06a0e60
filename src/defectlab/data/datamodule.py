"""The dataset and the one DataModule every model shares.

Batches are :class:`~defectlab.data.batch.Batch` dicts: ``image`` (B, 3, H, W) in [0, 1], ``label``
(0 good / 1 defective), ``mask`` (B, 1, H, W) when the category has masks, ``defect_type``, ``path``.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from defectlab.data.batch import Item
from defectlab.data.layout import (
    CategoryIndex,
    Sample,
    check_no_overlap,
    check_samples,
    scan_category,
    scan_labeled,
)
from defectlab.data.splits import check_val_ratio, split_holdout, take_labeled
from defectlab.data.transforms import build_transform, image_tensor
from defectlab.errors import ConfigError, DataError
from defectlab.imageio import DEFAULT_LIMITS, ImageLimits, load_image, load_mask

log = logging.getLogger(__name__)
BAD_FILE_POLICIES = ("error", "skip")


class AnomalyDataset(Dataset):
    """Samples -> batch dicts; ``with_masks`` adds a mask to every item (zeros for good images)."""

    def __init__(
        self,
        samples: list[Sample],
        transform: Callable,
        with_masks: bool,
        limits: ImageLimits = DEFAULT_LIMITS,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.with_masks = with_masks
        self.limits = limits

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        s = self.samples[index]
        pil = load_image(s.path, self.limits)
        image = image_tensor(pil)
        if not self.with_masks:
            return Item(
                image=self.transform(image), label=s.label, defect_type=s.defect_type, path=str(s.path)
            )
        if s.mask_path is None:
            mask = np.zeros((pil.height, pil.width), dtype=bool)
        else:
            mask = load_mask(s.mask_path, pil.size, s.path, self.limits)
        image, mask_t = self.transform(image, tv_tensors.Mask(torch.from_numpy(mask).unsqueeze(0)))
        return Item(
            image=image,
            label=s.label,
            mask=mask_t.to(torch.uint8),
            defect_type=s.defect_type,
            path=str(s.path),
        )


class AnomalyDataModule(L.LightningDataModule):
    """The one DataModule: MVTec layout, a seeded held-out slice of train/good, shared transforms.

    Args:
        root: folder holding ``<category>/`` sub-folders.
        category: the category to load.
        image_size: images are resized to ``image_size x image_size``.
        crop_size: optional centre crop after resizing (MVTec convention: 256 -> 224).
        brightness: None, or each image (after resizing and cropping) scaled so that its mean
            value is this grey level in (0, 1]: removes exposure differences between parts.
        val_ratio: fraction of train/good held out for threshold calibration (never fitted on).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the held-out split.
        val_dir: optional labeled validation folder (``good/``, ``<defect_type>/`` and optionally
            ``ground_truth/<defect_type>/<name>_mask.png``) for ``threshold=f1_val``; it must not
            share images with the category's train or test folders.
        labeled_anomalies: real defective images per defect type moved (seeded) from the test set
            into training, with their masks; only for supervised models (``model=unet``).
        shuffle_train: shuffle training batches (seeded); trained models set it, memory banks
            keep the file order.
        prepare: optional callable ``prepare(root)`` that writes the layout (ELPV, synthetic).
        on_bad_file: ``error`` (default): any unreadable image or mask, missing or mis-sized mask
            stops the run at setup with every bad file listed; ``skip``: they are logged, left
            out, and listed with their reason in results.json (``data_issues``).
        min_image_side: images (and masks) whose shorter side is smaller are bad files.
        max_image_pixels: images with more pixels are bad files (decompression-bomb guard).
        labelled_anomalies: deprecated spelling of ``labeled_anomalies`` (still accepted).
    """

    def __init__(
        self,
        root: str,
        category: str,
        image_size: int = 224,
        crop_size: int | None = None,
        brightness: float | None = None,
        val_ratio: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        val_dir: str | None = None,
        labeled_anomalies: int = 0,
        shuffle_train: bool = False,
        prepare: Callable[[Path], None] | None = None,
        on_bad_file: str = "error",
        min_image_side: int = 8,
        max_image_pixels: int = 178_956_970,
        labelled_anomalies: int | None = None,
    ) -> None:
        super().__init__()
        if labelled_anomalies is not None:
            warnings.warn(
                "data.labelled_anomalies is deprecated: spell it data.labeled_anomalies",
                FutureWarning,
                stacklevel=2,
            )
            labeled_anomalies = labelled_anomalies
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ConfigError(f"data.on_bad_file={on_bad_file}: choose one of {BAD_FILE_POLICIES}")
        if min_image_side < 1:
            raise ConfigError(f"data.min_image_side must be >= 1, got {min_image_side}")
        if max_image_pixels < min_image_side**2:
            raise ConfigError(
                f"data.max_image_pixels={max_image_pixels} is below data.min_image_side^2"
            )
        self.on_bad_file = on_bad_file
        self.limits = ImageLimits(min_image_side, max_image_pixels)
        self.skipped: list[dict[str, str]] = []
        self.root = Path(root)
        self.category = category
        self.transform = build_transform(image_size, crop_size, brightness)
        self.val_ratio = val_ratio
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_dir = None if val_dir is None else Path(val_dir)
        if labeled_anomalies < 0:
            raise ConfigError(f"data.labeled_anomalies must be >= 0, got {labeled_anomalies}")
        self.labeled_anomalies = labeled_anomalies
        self.shuffle_train = shuffle_train
        self.prepare = prepare
        self.index: CategoryIndex | None = None
        self.labeled_counts: dict[str, int] = {}
        self.labeled_val_set: AnomalyDataset | None = None
        check_val_ratio(val_ratio)

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        index = scan_category(self.root, self.category, self.on_bad_file)
        self.index = self._without_bad_files(index)
        fit, val = split_holdout(self.index.train, self.val_ratio, self.seed)
        masks = self.index.has_masks
        test, labeled = self.index.test, []
        if self.labeled_anomalies:
            if not masks:
                raise DataError(
                    f"data.labeled_anomalies={self.labeled_anomalies} needs defect masks, but "
                    f"{self.root / self.category}/ground_truth does not exist"
                )
            labeled, test = take_labeled(test, self.labeled_anomalies, self.seed)
            self.labeled_counts = dict(Counter(s.defect_type for s in labeled))
        self.fit_set = AnomalyDataset(fit + labeled, self.transform, bool(labeled), self.limits)
        self.val_set = AnomalyDataset(val, self.transform, False, self.limits)
        self.test_set = AnomalyDataset(test, self.transform, masks, self.limits)
        if self.val_dir is not None:
            self.labeled_val_set = self._labeled_val()

    def _without_bad_files(self, index: CategoryIndex) -> CategoryIndex:
        """Decode every file once; raise listing the bad ones, or leave them out (``skip``)."""
        bad = check_samples(index.train + index.test, self.limits)
        if bad and self.on_bad_file == "error":
            listed = "\n  ".join(b["reason"] for b in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise DataError(
                f"{len(bad)} bad file(s) in {self.root / self.category}:\n  {listed}{more}\n"
                "Fix or remove them, or set data.on_bad_file=skip to leave them out (each is "
                "logged and listed in results.json)."
            )
        for b in bad:
            log.warning("skipping %s", b["reason"])
        self.skipped = index.skipped + bad
        dropped = {b["path"] for b in bad}
        train = [s for s in index.train if str(s.path) not in dropped]
        test = [s for s in index.test if str(s.path) not in dropped]
        if not train:
            raise DataError(
                f"{self.root / self.category}/train/good: none of its {len(index.train)} images "
                "is readable (all skipped); see the warnings above"
            )
        if not test:
            raise DataError(f"{self.root / self.category}/test: no readable test image left")
        return CategoryIndex(train, test, index.has_masks, index.orphan_masks, self.skipped)

    def _labeled_val(self) -> AnomalyDataset:
        if not self.val_dir.is_dir():
            raise DataError(
                f"data.val_dir={self.val_dir} is not a folder: give a folder with good/ and "
                "<defect_type>/ sub-folders, or data.val_dir=null"
            )
        gt_dir = self.val_dir / "ground_truth"
        samples = scan_labeled(self.val_dir, gt_dir if gt_dir.is_dir() else None)
        check_no_overlap(samples, {"test": self.index.test, "training": self.index.train})
        return AnomalyDataset(samples, self.transform, gt_dir.is_dir(), self.limits)

    def _loader(self, dataset: AnomalyDataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.fit_set, shuffle=self.shuffle_train)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Held-out good slice (index 0), plus the labeled validation folder (index 1) if given."""
        if self.labeled_val_set is None:
            return self._loader(self.val_set)
        return [self._loader(self.val_set), self._loader(self.labeled_val_set)]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
