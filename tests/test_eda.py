"""The dataset report: numbers, figures, and an integrity scan that finds exactly what is wrong."""

import json
import shutil

import pytest
from PIL import Image

from defectlab.eda import run_eda, scan_category
from defectlab.errors import DataError

pytestmark = pytest.mark.e2e


@pytest.fixture
def planted(synthetic_root, tmp_path):
    """A copy of synthetic brick with one of each planted problem; returns (root, expected)."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "brick", root / "brick")
    base = root / "brick"
    good = base / "test" / "good"
    truncated = good / "900.png"
    truncated.write_bytes((good / "000.png").read_bytes()[:400])
    zero = base / "train" / "good" / "901.png"
    zero.write_bytes(b"")
    orphan = base / "ground_truth" / "hole" / "950_mask.png"
    shutil.copy(base / "ground_truth" / "hole" / "000_mask.png", orphan)
    off_size = base / "test" / "good" / "902.png"
    Image.open(good / "001.png").resize((80, 96)).save(off_size)
    expected = {
        ("truncated", str(truncated)),
        ("zero_byte", str(zero)),
        ("orphan_mask", str(orphan)),
        ("wrong_size", str(off_size)),
    }
    return root, expected


def test_integrity_scan_finds_every_planted_problem_and_nothing_else(planted, synthetic_root):
    root, expected = planted
    assert scan_category(synthetic_root / "brick").problems == []  # the clean set is clean
    found = {(p["kind"], p["path"]) for p in scan_category(root / "brick").problems}
    assert found == expected


def test_integrity_scan_flags_modes_duplicates_and_missing_masks(synthetic_root, tmp_path):
    base = tmp_path / "brick"
    shutil.copytree(synthetic_root / "brick", base)
    rgba = base / "test" / "good" / "903.png"
    Image.open(base / "test" / "good" / "000.png").convert("RGBA").save(rgba)
    duplicate = base / "train" / "good" / "904.png"
    shutil.copy(base / "train" / "good" / "000.png", duplicate)
    (base / "ground_truth" / "scratch" / "001_mask.png").unlink()
    fake = base / "test" / "stain" / "905.png"
    fake.write_text("not an image")
    found = {(p["kind"], p["path"]) for p in scan_category(base).problems}
    assert found == {
        ("wrong_mode", str(rgba)),
        ("duplicate", str(duplicate)),
        ("missing_mask", str(base / "test" / "scratch" / "001.png")),
        ("unreadable", str(fake)),
    }


def test_eda_writes_page_and_numbers(planted, make_cfg, tmp_path):
    root, expected = planted
    out = tmp_path / "eda"
    numbers = run_eda(
        make_cfg("data=synthetic", f"data.root={root}", "data.prepare=null", config="eda", out=out)
    )
    brick = numbers["categories"]["brick"]
    assert brick["counts"]["test"] == {"good": 10, "hole": 4, "scratch": 4, "stain": 4}
    assert brick["counts"]["train"] == {"good": 25}
    assert brick["sizes"] == {"96x96": 44, "80x96": 1}  # readable images only
    assert brick["masks"] == 12 and 0 < brick["mask_area"]["median"] < 0.2
    assert numbers["problem_count"] == len(expected)
    assert json.loads((out / "eda.json").read_text()) == numbers
    page = (out / "eda.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # counts, intensities, masks
    assert "orphan_mask" in page and "Integrity problems (4)" in page
    with pytest.raises(DataError, match="found: \\['brick'\\]"):
        run_eda(
            make_cfg(
                "data=synthetic",
                f"data.root={root}",
                "data.prepare=null",
                "categories=[screw]",
                config="eda",
                out=out,
            )
        )
