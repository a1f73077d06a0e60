"""MVTec-AD-layout dataset and the one DataModule every model shares.

Layout: ``<root>/<category>/train/good/*``, ``test/<defect_type>/*`` and, when pixel labels exist,
``ground_truth/<defect_type>/<name>_mask.png``. Batches are dicts with ``image`` (B, 3, H, W) in
[0, 1], ``label`` (0 good / 1 defective), ``mask`` (B, 1, H, W) when the category has masks,
``defect_type`` and ``path``.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from defectlab.errors import ConfigError, DataError

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

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test if s.label == 1})


def images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def scan_category(root: str | Path, category: str) -> CategoryIndex:
    """Index ``<root>/<category>`` in MVTec AD layout, raising :class:`DataError` on layout problems."""
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
    test = scan_labelled(test_dir, gt_dir if gt_dir.is_dir() else None)
    return CategoryIndex(train=train, test=test, has_masks=gt_dir.is_dir())


def scan_labelled(folder: Path, gt_dir: Path | None) -> list[Sample]:
    """Samples of a labelled folder: ``good/`` and ``<defect_type>/`` sub-folders.

    With ``gt_dir``, every defective image needs ``<gt_dir>/<defect_type>/<name>_mask.png``.
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
                    raise DataError(
                        f"{path}: its mask {mask} is missing. Add it, or remove {gt_dir} to run "
                        "without pixel-level metrics."
                    )
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


def load_image(path: Path) -> Image.Image:
    """Open an image fully as RGB (grayscale is replicated to 3 channels), or raise DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{path}: cannot be read as an image ({err}). Replace or remove the file."
        ) from err


def image_tensor(pil: Image.Image) -> tv_tensors.Image:
    """``(3, H, W)`` uint8 tensor of an RGB PIL image, ready for :func:`build_transform`."""
    return tv_tensors.Image(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))


def load_mask(path: Path, size: tuple[int, int], image_path: Path) -> np.ndarray:
    """Binary mask (any non-zero pixel is defective) of the image's size, or raise DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            mask = img.convert("L")
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as a mask ({err}). Replace the file.") from err
    if mask.size != size:
        raise DataError(
            f"{path}: mask size {mask.size} differs from its image {image_path} {size}; "
            "masks must have the image's width and height"
        )
    return np.asarray(mask) > 0


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

    def __init__(self, samples: list[Sample], transform: Callable, with_masks: bool) -> None:
        self.samples = samples
        self.transform = transform
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        pil = load_image(s.path)
        image = image_tensor(pil)
        item = {"label": s.label, "defect_type": s.defect_type, "path": str(s.path)}
        if not self.with_masks:
            item["image"] = self.transform(image)
            return item
        if s.mask_path is None:
            mask = np.zeros((pil.height, pil.width), dtype=bool)
        else:
            mask = load_mask(s.mask_path, pil.size, s.path)
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
    ) -> None:
        super().__init__()
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
        self.index = scan_category(self.root, self.category)
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
        self.fit_set = AnomalyDataset(fit + labeled, self.transform, with_masks=bool(labeled))
        self.val_set = AnomalyDataset(val, self.transform, with_masks=False)
        self.test_set = AnomalyDataset(test, self.transform, with_masks=masks)
        if self.val_dir is not None:
            self.labelled_val_set = self._labelled_val()

    def _labelled_val(self) -> AnomalyDataset:
        if not self.val_dir.is_dir():
            raise DataError(
                f"data.val_dir={self.val_dir} is not a folder: give a folder with good/ and "
                "<defect_type>/ sub-folders, or data.val_dir=null"
            )
        gt_dir = self.val_dir / "ground_truth"
        samples = scan_labelled(self.val_dir, gt_dir if gt_dir.is_dir() else None)
        check_no_overlap(samples, {"test": self.index.test, "training": self.index.train})
        return AnomalyDataset(samples, self.transform, with_masks=gt_dir.is_dir())

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
