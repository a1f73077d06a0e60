"""MVTec-AD folder layout: what a category folder must hold, scanned into labeled samples.

``<root>/<category>/train/good/*``, ``test/<defect_type>/*`` and, when pixel labels exist,
``ground_truth/<defect_type>/<name>_mask.png``. The one scanner of this layout: the DataModule,
the dataset report (:mod:`defectlab.eda`), defect-type classification and benchmarks use it.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from defectlab.errors import DataError
from defectlab.imageio import ImageLimits, load_image, load_mask

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
GOOD = "good"
MASK_SUFFIX = "_mask"  # ground_truth/<defect_type>/<image stem>_mask.png


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
    """Image files directly in ``folder`` (by extension), sorted."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def mask_path(gt_dir: Path, defect_type: str, image: Path) -> Path:
    """Where the mask of test image ``image`` of ``defect_type`` must be."""
    return gt_dir / defect_type / f"{image.stem}{MASK_SUFFIX}.png"


def split_folders(base: Path) -> list[tuple[str, Path]]:
    """``("train" | "test", <type folder>)`` for every type folder of category folder ``base``."""
    return [
        (split, d)
        for split in ("train", "test")
        for d in sorted((base / split).glob("*"))
        if d.is_dir()
    ]


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
    test = scan_labeled(
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
            if m.stem.removesuffix(MASK_SUFFIX) not in stems
        ]
    return orphans


def scan_labeled(
    folder: Path, gt_dir: Path | None, skipped: list[dict[str, str]] | None = None
) -> list[Sample]:
    """Samples of a labeled folder: ``good/`` and ``<defect_type>/`` sub-folders.

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
                mask = mask_path(gt_dir, type_dir.name, path)
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
