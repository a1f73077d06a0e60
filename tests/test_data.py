"""MVTec layout parsing, held-out split, batches and loud data errors."""

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from defectlab.data import AnomalyDataModule, scan_category, split_holdout
from defectlab.errors import ConfigError, DataError


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(src, dst)
    return dst


def test_scan_finds_types_labels_and_masks(synthetic_root):
    index = scan_category(synthetic_root, "brick")
    assert index.has_masks
    assert index.defect_types == ["hole", "scratch", "stain"]
    assert len(index.train) == 24
    good = [s for s in index.test if s.label == 0]
    bad = [s for s in index.test if s.label == 1]
    assert len(good) == 8 and len(bad) == 12
    assert all(s.mask_path is None for s in good)
    assert all(s.mask_path.name == f"{s.path.stem}_mask.png" and s.mask_path.is_file() for s in bad)
    assert all(s.mask_path.parent.name == s.defect_type for s in bad)


def test_batches_are_dicts_with_masks(synthetic_root):
    dm = AnomalyDataModule(str(synthetic_root), "brick", image_size=64, batch_size=40)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (20, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    assert batch["mask"].shape == (20, 1, 64, 64)
    assert set(batch["mask"].unique().tolist()) <= {0, 1}
    labels = batch["label"].tolist()
    for label, mask, dtype in zip(labels, batch["mask"], batch["defect_type"], strict=True):
        assert (label == 1) == (mask.sum() > 0) and (label == 0) == (dtype == "good")
    train = next(iter(dm.train_dataloader()))
    assert "mask" not in train and set(train["label"].tolist()) == {0}


def test_crop_size_applies_to_images_and_masks(synthetic_root):
    dm = AnomalyDataModule(str(synthetic_root), "brick", image_size=80, crop_size=64, batch_size=4)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape[-2:] == (64, 64) and batch["mask"].shape[-2:] == (64, 64)


def test_brightness_scales_each_image_to_its_mean_and_leaves_masks(synthetic_root):
    kwargs = {"image_size": 64, "batch_size": 40}
    plain = AnomalyDataModule(str(synthetic_root), "brick", **kwargs)
    scaled = AnomalyDataModule(str(synthetic_root), "brick", brightness=0.3, **kwargs)
    for dm in (plain, scaled):
        dm.setup()
    a, b = (next(iter(dm.test_dataloader())) for dm in (plain, scaled))
    means = b["image"].mean(dim=(1, 2, 3))
    torch.testing.assert_close(means, torch.full_like(means, 0.3))
    # one factor per image: its pixels keep their ratios; masks are untouched
    factor = 0.3 / a["image"].mean(dim=(1, 2, 3))
    torch.testing.assert_close(b["image"], a["image"] * factor[:, None, None, None])
    assert torch.equal(a["mask"], b["mask"])
    assert not torch.allclose(a["image"].mean(dim=(1, 2, 3)), means)  # the set's levels differ


def test_brightness_in_exported_graphs_equals_the_transform(synthetic_root):
    from defectlab.data import build_transform, image_tensor, preprocess_uint8
    from defectlab.imageio import load_image

    paths = sorted((synthetic_root / "brick" / "test").glob("*/000.png"))
    raw = [image_tensor(load_image(p)) for p in paths]
    loaded = torch.stack([build_transform(64, 48, 0.55)(x) for x in raw])
    graph = preprocess_uint8(torch.stack(raw), 64, 48, brightness=0.55)
    torch.testing.assert_close(graph, loaded, rtol=1e-6, atol=1e-6)
    black = preprocess_uint8(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 8, brightness=0.5)
    assert torch.equal(black, torch.zeros(1, 3, 8, 8))  # nothing to scale: stays black


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "bright", True])
def test_bad_brightness_names_the_key(synthetic_root, bad):
    with pytest.raises(ConfigError, match=r"data\.brightness=.*\(0, 1\]"):
        AnomalyDataModule(str(synthetic_root), "brick", brightness=bad)


def test_holdout_split_is_seeded_disjoint_and_never_touches_test(synthetic_root):
    index = scan_category(synthetic_root, "brick")
    fit, val = split_holdout(index.train, 0.25, seed=3)
    fit2, val2 = split_holdout(index.train, 0.25, seed=3)
    _, val3 = split_holdout(index.train, 0.25, seed=4)
    assert (fit, val) == (fit2, val2) and val != val3
    assert len(val) == 6 and not set(fit) & set(val)
    assert set(fit) | set(val) == set(index.train)
    with pytest.raises(ConfigError, match="data.val_ratio"):
        split_holdout(index.train, 1.0, seed=0)


def test_missing_mask_names_the_image(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    (root / "brick/ground_truth/hole/001_mask.png").unlink()
    with pytest.raises(DataError, match=r"hole/001\.png.*001_mask\.png"):
        scan_category(root, "brick")


def test_empty_and_missing_folders(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    for f in (root / "brick/test/stain").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"test/stain is empty"):
        scan_category(root, "brick")
    shutil.rmtree(root / "grass/train/good")
    with pytest.raises(DataError, match=r"train/good is missing"):
        scan_category(root, "grass")


def test_unknown_category_lists_the_ones_found(synthetic_root):
    with pytest.raises(DataError, match=r"data.category=bottle.*\['brick', 'grass'\]"):
        scan_category(synthetic_root, "bottle")


def test_truncated_image_error_names_the_file(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    bad = root / "brick/test/good/003.png"
    bad.write_bytes(bad.read_bytes()[:200])
    dm = AnomalyDataModule(str(root), "brick", image_size=64, batch_size=64)
    with pytest.raises(DataError, match=r"(?s)1 bad file.*test/good/003\.png: cannot be read"):
        dm.setup()  # at setup, before any model work


def test_mask_of_wrong_size_error_names_the_file(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    mask = root / "brick/ground_truth/scratch/002_mask.png"
    Image.new("L", (50, 50)).save(mask)
    dm = AnomalyDataModule(str(root), "brick", image_size=64, batch_size=64)
    with pytest.raises(DataError, match=r"002_mask\.png: mask size \(50, 50\)"):
        dm.setup()


def test_category_without_ground_truth_has_no_masks(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    shutil.rmtree(root / "brick/ground_truth")
    dm = AnomalyDataModule(str(root), "brick", image_size=64, batch_size=64)
    dm.setup()
    assert "mask" not in next(iter(dm.test_dataloader()))


def test_deprecated_labelled_spelling_is_accepted_with_a_warning(synthetic_root):
    with pytest.warns(FutureWarning, match="spell it data.labeled_anomalies"):
        dm = AnomalyDataModule(str(synthetic_root), "brick", image_size=64, labelled_anomalies=1)
    dm.setup()
    assert dm.labeled_counts == {"hole": 1, "scratch": 1, "stain": 1}
