"""MVTec-AD-layout dataset and the one DataModule every model shares.

Layout: ``<root>/<category>/train/good/*``, ``test/<defect_type>/*`` and, when pixel labels exist,
``ground_truth/<defect_type>/<name>_mask.png``. Batches are dicts with ``image`` (B, 3, H, W) in
[0, 1], ``label`` (0 good / 1 defective), ``mask`` (B, 1, H, W) when the category has masks,
``defect_type`` and ``path``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from defectlab.errors import ConfigError, DataError
from defectlab.imageio import DEFAULT_LIMITS, ImageLimits, load_image, load_mask

log = logging.getLogger(__name__)
BAD_FILE_POLICIES = ("error", "skip")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image on disk with its label, defect type and (optional) mask path."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


@dataclass(frozen=True)
class CategoryIndex:
    """Every sample of one category, as found on disk."""

    train: list[Sample]
    test: list[Sample]
    has_masks: bool
    orphan_masks: list[Path] = field(default_factory=list)
    # on_bad_file=skip: defective images left out because their mask is missing.
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.label == 1})


def images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def scan_category(root: str | Path, category: str, on_bad_file: str = "error") -> CategoryIndex:
    """Index ``<root>/<category>`` in MVTec AD layout, raising :class:`DataError` on layout problems.

    ``on_bad_file=skip`` leaves out defective images whose mask is missing (listed in
    ``skipped``) instead of raising; masks without an image are listed in ``orphan_masks``.
    """
    root = Path(root)
    base = root / category
    if not base.is_dir():
        found = (
            sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
            if root.is_dir()
            else []
        )
        raise DataError(
            f"data.category={category}: no folder {base}. "
            + (f"Categories found under {root}: {found}" if found else f"{root} holds no category.")
        )
    train_dir = base / "train" / GOOD
    if not train_dir.is_dir():
        raise DataError(f"{train_dir} is missing: put the defect-free training images there")
    train = [Sample(p, 0, GOOD) for p in images_in(train_dir)]
    if not train:
        raise DataError(
            f"{train_dir} holds no images ({sorted(IMAGE_EXTENSIONS)}): add good images"
        )
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DataError(
            f"{test_dir} is missing: put test images in test/good and test/<defect_type>"
        )
    gt_dir = base / "ground_truth"
    skipped: list[dict[str, str]] = []
    test = scan_labelled(
        test_dir, gt_dir if gt_dir.is_dir() else None, skipped if on_bad_file == "skip" else None
    )
    orphans = orphan_masks(test_dir, gt_dir)
    if orphans:
        log.warning(
            "%d mask(s) under %s have no test image (ignored): %s",
            len(orphans),
            gt_dir,
            ", ".join(str(p) for p in orphans[:10]) + (" ..." if len(orphans) > 10 else ""),
        )
    return CategoryIndex(
        train=train, test=test, has_masks=gt_dir.is_dir(), orphan_masks=orphans, skipped=skipped
    )


def orphan_masks(test_dir: Path, gt_dir: Path) -> list[Path]:
    """Files in ``ground_truth/<type>/`` that are not ``<image stem>_mask.*`` of a test image."""
    if not gt_dir.is_dir():
        return []
    orphans = []
    for type_dir in sorted(d for d in gt_dir.iterdir() if d.is_dir()):
        stems = (
            {p.stem for p in images_in(test_dir / type_dir.name)}
            if (test_dir / type_dir.name).is_dir()
            else set()
        )
        orphans += [
            m
            for m in sorted(p for p in type_dir.iterdir() if p.is_file())
            if m.stem.removesuffix("_mask") not in stems
        ]
    return orphans


def scan_labelled(
    folder: Path, gt_dir: Path | None, skipped: list[dict[str, str]] | None = None
) -> list[Sample]:
    """Samples of a labelled folder: ``good/`` and ``<defect_type>/`` sub-folders.

    With ``gt_dir``, every defective image needs ``<gt_dir>/<defect_type>/<name>_mask.png``;
    a missing one raises DataError, or, given a ``skipped`` list, is recorded there and left out.
    """
    samples: list[Sample] = []
    for type_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if gt_dir is not None and type_dir == gt_dir:
            continue
        images = images_in(type_dir)
        if not images:
            raise DataError(f"{type_dir} is empty: add images or remove the folder")
        for path in images:
            if type_dir.name == GOOD:
                samples.append(Sample(path, 0, GOOD))
                continue
            mask = None
            if gt_dir is not None:
                mask = gt_dir / type_dir.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    message = (
                        f"{path}: its mask {mask} is missing. Add it, remove {gt_dir} to run "
                        "without pixel-level metrics, or set data.on_bad_file=skip."
                    )
                    if skipped is None:
                        raise DataError(message)
                    log.warning("skipping %s", message)
                    skipped.append({"path": str(path), "reason": message})
                    continue
            samples.append(Sample(path, 1, type_dir.name, mask))
    if not samples:
        raise DataError(f"{folder} holds no images: add good/ and <defect_type>/ folders")
    return samples


def check_no_overlap(val: list[Sample], others: dict[str, list[Sample]]) -> None:
    """Raise DataError if a validation image is byte-identical to one of ``others`` (by role).

    Compares content hashes, not paths: a test image copied into the validation folder would
    otherwise leak test data into the threshold.
    """
    val_digests = {_digest(s.path): s.path for s in val}
    for what, samples in others.items():
        for s in samples:
            twin = val_digests.get(_digest(s.path))
            if twin is not None:
                raise DataError(
                    f"data.val_dir: {twin} is identical to {what} image {s.path}. Validation "
                    "images must be neither training nor test images; remove it from the "
                    "validation folder."
                )


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def image_tensor(pil: Image.Image) -> tv_tensors.Image:
    """``(3, H, W)`` uint8 tensor of an RGB PIL image, ready for :func:`build_transform`."""
    return tv_tensors.Image(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))


def check_samples(samples: list[Sample], limits: ImageLimits) -> list[dict[str, str]]:
    """Decode every image (and its mask) once; ``[{"path", "reason"}]`` for each bad one.

    Run before any model work, so a bad file fails the run (or is skipped) at the start, not in
    the middle of testing. Threads: Pillow releases the GIL while decoding.
    """

    def one(sample: Sample) -> dict[str, str] | None:
        try:
            img = load_image(sample.path, limits)
            if sample.mask_path is not None:
                load_mask(sample.mask_path, img.size, sample.path, limits)
        except DataError as err:
            return {"path": str(sample.path), "reason": str(err)}
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        return [bad for bad in pool.map(one, samples) if bad is not None]


def build_transform(image_size: int, crop_size: int | None) -> v2.Compose:
    """Resize (and optionally centre-crop) images and masks alike; images become float in [0, 1]."""
    if image_size <= 0:
        raise ConfigError(f"data.image_size must be positive, got {image_size}")
    if crop_size is not None and not 0 < crop_size <= image_size:
        raise ConfigError(
            f"data.crop_size={crop_size} must be in (0, data.image_size={image_size}]"
        )
    steps: list[v2.Transform] = [v2.Resize((image_size, image_size), antialias=True)]
    if crop_size is not None:
        steps.append(v2.CenterCrop(crop_size))
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    return v2.Compose(steps)


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

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        pil = load_image(s.path, self.limits)
        image = image_tensor(pil)
        item = {"label": s.label, "defect_type": s.defect_type, "path": str(s.path)}
        if not self.with_masks:
            item["image"] = self.transform(image)
            return item
        if s.mask_path is None:
            mask = np.zeros((pil.height, pil.width), dtype=bool)
        else:
            mask = load_mask(s.mask_path, pil.size, s.path, self.limits)
        image, mask_t = self.transform(image, tv_tensors.Mask(torch.from_numpy(mask).unsqueeze(0)))
        item["image"] = image
        item["mask"] = mask_t.to(torch.uint8)
        return item


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


class AnomalyDataModule(L.LightningDataModule):
    """The one DataModule: MVTec layout, a seeded held-out slice of train/good, shared transforms.

    Args:
        root: folder holding ``<category>/`` sub-folders.
        category: the category to load.
        image_size: images are resized to ``image_size x image_size``.
        crop_size: optional centre crop after resizing (MVTec convention: 256 -> 224).
        val_ratio: fraction of train/good held out for threshold calibration (never fitted on).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the held-out split.
        val_dir: optional labelled validation folder (``good/``, ``<defect_type>/`` and optionally
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
    """

    def __init__(
        self,
        root: str,
        category: str,
        image_size: int = 224,
        crop_size: int | None = None,
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
    ) -> None:
        super().__init__()
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
        self.transform = build_transform(image_size, crop_size)
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
        self.labelled_val_set: AnomalyDataset | None = None
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
            self.labelled_val_set = self._labelled_val()

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

    def _labelled_val(self) -> AnomalyDataset:
        if not self.val_dir.is_dir():
            raise DataError(
                f"data.val_dir={self.val_dir} is not a folder: give a folder with good/ and "
                "<defect_type>/ sub-folders, or data.val_dir=null"
            )
        gt_dir = self.val_dir / "ground_truth"
        samples = scan_labelled(self.val_dir, gt_dir if gt_dir.is_dir() else None)
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
        """Held-out good slice (index 0), plus the labelled validation folder (index 1) if given."""
        if self.labelled_val_set is None:
            return self._loader(self.val_set)
        return [self._loader(self.val_set), self._loader(self.labelled_val_set)]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)
