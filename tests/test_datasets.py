"""Dataset preparers: the real ELPV split and the synthetic generator, both cached."""

import json

import numpy as np
import pytest

from defectlab.datasets import ElpvPreparer, SyntheticPreparer
from defectlab.datasets.cache import MANIFEST
from defectlab.datasets.elpv import _labels
from defectlab.errors import ConfigError, DataError


def test_elpv_split_follows_the_documented_rule(tmp_path):
    ElpvPreparer(categories=("mono",), train_ratio=0.6, defect_threshold=1.0, seed=0)(tmp_path)
    _, paths, probs, types = _labels()
    mono = types == "mono"
    good = {p.split("/")[-1] for p in paths[mono & (probs == 0)]}
    bad = {p.split("/")[-1] for p in paths[mono & (probs >= 1.0)]}
    files = {
        part: {f.name for f in (tmp_path / "mono" / part).iterdir()}
        for part in ("train/good", "test/good", "test/defective")
    }
    assert files["train/good"] | files["test/good"] == good
    assert not files["train/good"] & files["test/good"]
    assert len(files["train/good"]) == round(0.6 * len(good))
    assert files["test/defective"] == bad
    assert not (tmp_path / "poly").exists()


def test_elpv_cutoff_is_configurable_and_cache_rewrites_on_change(tmp_path):
    ElpvPreparer(categories=("poly",), defect_threshold=1.0)(tmp_path)
    n_strict = len(list((tmp_path / "poly/test/defective").iterdir()))
    mtime = (tmp_path / "poly" / MANIFEST).stat().st_mtime_ns
    ElpvPreparer(categories=("poly",), defect_threshold=1.0)(tmp_path)  # cached: untouched
    assert (tmp_path / "poly" / MANIFEST).stat().st_mtime_ns == mtime
    ElpvPreparer(categories=("poly",), defect_threshold=0.5)(tmp_path)
    assert len(list((tmp_path / "poly/test/defective").iterdir())) > n_strict
    assert json.loads((tmp_path / "poly" / MANIFEST).read_text())["defect_threshold"] == 0.5


def test_preparer_never_overwrites_user_data(tmp_path):
    (tmp_path / "mono").mkdir()
    with pytest.raises(DataError, match="not written by defectlab"):
        ElpvPreparer(categories=("mono",))(tmp_path)
    with pytest.raises(ConfigError, match="defect_threshold"):
        ElpvPreparer(defect_threshold=0)


def test_synthetic_is_deterministic_with_exact_masks(tmp_path):
    kwargs = dict(
        categories=("gravel",), image_size=64, num_train=3, num_test_good=2, num_test_defect=2
    )
    SyntheticPreparer(**kwargs)(tmp_path / "a")
    SyntheticPreparer(**kwargs)(tmp_path / "b")
    from PIL import Image

    for kind in ("scratch", "hole", "stain"):
        for i in range(2):
            a = np.asarray(Image.open(tmp_path / f"a/gravel/test/{kind}/{i:03d}.png"))
            b = np.asarray(Image.open(tmp_path / f"b/gravel/test/{kind}/{i:03d}.png"))
            mask = np.asarray(
                Image.open(tmp_path / f"a/gravel/ground_truth/{kind}/{i:03d}_mask.png")
            )
            assert np.array_equal(a, b)
            assert set(np.unique(mask)) == {0, 255} and 0 < (mask > 0).mean() < 0.2
