"""Bad input gets defined behaviour: converted where sensible, otherwise a DataError naming the file."""

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from defectlab.data import AnomalyDataModule, scan_category
from defectlab.errors import DataError
from defectlab.imageio import ImageLimits, load_image, load_mask


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(src, dst)
    return dst


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


# -- image conversions --------------------------------------------------------------------------
def test_grayscale_palette_cmyk_and_one_bit_become_rgb(tmp_path):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
    out = load_image(_save(gray, tmp_path / "g.png"))
    assert out.mode == "RGB" and out.size == (8, 8)
    assert (np.asarray(out) == np.asarray(gray)[..., None]).all()  # replicated to 3 channels
    pal = gray.convert("P")
    assert np.array_equal(np.asarray(load_image(_save(pal, tmp_path / "p.png"))), np.asarray(out))
    cmyk = Image.new("CMYK", (9, 9), (0, 255, 0, 0))
    assert load_image(_save(cmyk, tmp_path / "c.jpg")).getpixel((4, 4))[0] > 200  # cyan-free red
    assert load_image(_save(gray.convert("1"), tmp_path / "b.png")).mode == "RGB"


def test_alpha_is_dropped_keeping_the_colours(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (200, 100, 50, 0))  # fully transparent
    assert load_image(_save(rgba, tmp_path / "a.png")).getpixel((0, 0)) == (200, 100, 50)
    pal = Image.new("P", (10, 10), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    pal.info["transparency"] = 3
    assert load_image(_save(pal, tmp_path / "t.png", transparency=3)).getpixel((0, 0)) == (
        10,
        20,
        30,
    )


def test_sixteen_bit_is_scaled_to_eight_bit(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 65278]], dtype=np.uint16)
    values = np.repeat(np.repeat(values, 8, axis=0), 8, axis=1)
    path = _save(Image.fromarray(values), tmp_path / "16.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))[..., 0]
    assert out[0, ::8].tolist() == [0, 1, 128]
    assert out[8, ::8].tolist() == [255, 4, 254]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "o.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # upright as a viewer shows it
    assert np.asarray(out)[:8].mean() > 200 and np.asarray(out)[-8:].mean() < 50  # white on top


def test_float_and_out_of_range_integer_images_are_refused(tmp_path):
    path = _save(Image.fromarray(np.ones((9, 9), dtype=np.float32)), tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: 32-bit float image"):
        load_image(path)
    big = np.full((9, 9), 70_000, dtype=np.int32)
    path = _save(Image.fromarray(big, "I"), tmp_path / "i.tif")
    with pytest.raises(DataError, match=r"i\.tif: 32-bit integer image with values 70000"):
        load_image(path)


def test_too_small_and_too_large_images_are_refused(tmp_path):
    tiny = _save(Image.new("RGB", (4, 30)), tmp_path / "tiny.png")
    with pytest.raises(DataError, match=r"tiny\.png: 4x30 is smaller than data.min_image_side=8"):
        load_image(tiny)
    assert load_image(tiny, ImageLimits(min_side=4)).size == (4, 30)
    big = _save(Image.new("RGB", (300, 200)), tmp_path / "big.png")
    with pytest.raises(DataError, match=r"big\.png: 300x200 = 60000 pixels exceeds data.max_image"):
        load_image(big, ImageLimits(max_pixels=50_000))


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "zero-byte file"),
        (b"this is a text file, not a png", "not a recognised image format"),
        ("truncated", "truncated"),
    ],
    ids=["zero-byte", "not-an-image", "truncated"],
)
def test_unreadable_files_raise_data_error_naming_them(tmp_path, content, match):
    path = tmp_path / "bad.png"
    if content == "truncated":
        full = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            full, "PNG"
        )
        content = full.getvalue()[: len(full.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"bad\.png: .*{match}"):
        load_image(path)


# -- masks --------------------------------------------------------------------------------------
def test_binary_masks_in_any_encoding(tmp_path):
    m = np.zeros((16, 16), np.uint8)
    m[4:8, 4:8] = 1
    for name, img in {
        "01.png": Image.fromarray(m),
        "0255.png": Image.fromarray(m * 255),
        "bit.png": Image.fromarray(m * 255).convert("1"),
        "16.png": Image.fromarray(m.astype(np.uint16)),
        "16full.png": Image.fromarray(m.astype(np.uint16) * 65535),
    }.items():
        out = load_mask(_save(img, tmp_path / name), (16, 16), "img.png")
        assert np.array_equal(out, m > 0), name


def test_non_binary_mask_is_binarised_at_half_range_with_a_warning(tmp_path, caplog):
    m = np.zeros((16, 16), np.uint8)
    m[:, 8:] = 255
    m[:, 7] = 127  # antialiased edge
    m[:, 6] = 128
    path = _save(Image.fromarray(m), tmp_path / "soft_mask.png")
    with caplog.at_level(logging.WARNING):
        out = load_mask(path, (16, 16), "img.png")
    assert out[:, 6].all() and not out[:, 7].any() and out[:, 8:].all()
    assert "soft_mask.png: mask is not binary" in caplog.text


def test_missing_and_orphan_masks(synthetic_root, tmp_path, caplog):
    root = _copy(synthetic_root, tmp_path)
    (root / "brick/ground_truth/hole/001_mask.png").unlink()
    shutil.copy(
        root / "brick/ground_truth/hole/000_mask.png", root / "brick/ground_truth/hole/777_mask.png"
    )
    with pytest.raises(DataError, match=r"hole/001\.png: its mask .* is missing.*on_bad_file=skip"):
        scan_category(root, "brick")
    with caplog.at_level(logging.WARNING):
        index = scan_category(root, "brick", on_bad_file="skip")
    assert [Path(s["path"]).name for s in index.skipped] == ["001.png"]
    assert [p.name for p in index.orphan_masks] == ["777_mask.png"]
    assert "have no test image (ignored)" in caplog.text and "skipping" in caplog.text
    assert all(s.path.name != "001.png" or s.defect_type != "hole" for s in index.test)


# -- policy at setup ----------------------------------------------------------------------------
def _damage(root: Path) -> list[str]:
    (root / "brick/train/good/000.png").write_bytes(b"")  # zero-byte
    bad = root / "brick/test/good/003.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    (root / "brick/test/scratch/002.png").write_text("not an image")
    Image.new("L", (50, 50)).save(root / "brick/ground_truth/stain/001_mask.png")  # wrong size
    return ["train/good/000.png", "test/good/003.png", "test/scratch/002.png", "test/stain/001.png"]


def test_on_bad_file_error_lists_every_bad_file_at_setup(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    damaged = _damage(root)
    dm = AnomalyDataModule(str(root), "brick", image_size=64)
    with pytest.raises(DataError, match=r"4 bad file\(s\)") as err:
        dm.setup()
    for name in damaged:
        assert name.replace("test/stain/001.png", "001_mask.png") in str(err.value)
    assert "data.on_bad_file=skip" in str(err.value)


def test_on_bad_file_skip_leaves_them_out_and_lists_them(synthetic_root, tmp_path, caplog):
    root = _copy(synthetic_root, tmp_path)
    damaged = _damage(root)
    dm = AnomalyDataModule(str(root), "brick", image_size=64, on_bad_file="skip")
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert sorted(s["path"].split("brick/")[1] for s in dm.skipped) == sorted(damaged)
    assert caplog.text.count("skipping") == 4
    used = {str(s.path) for ds in (dm.fit_set, dm.val_set, dm.test_set) for s in ds.samples}
    assert not used & {s["path"] for s in dm.skipped}
    assert len(dm.fit_set) + len(dm.val_set) == 23 and len(dm.test_set) == 8 + 12 - 3
    for batch in dm.test_dataloader():  # every remaining file loads
        assert batch["image"].shape[-1] == 64


def test_bad_data_config_values_name_the_key(synthetic_root):
    from defectlab.errors import ConfigError

    for kwargs, key in [
        ({"on_bad_file": "ignore"}, "data.on_bad_file=ignore"),
        ({"min_image_side": 0}, "data.min_image_side"),
        ({"max_image_pixels": 10}, "data.max_image_pixels"),
    ]:
        with pytest.raises(ConfigError, match=key):
            AnomalyDataModule(str(synthetic_root), "brick", **kwargs)


# -- fuzz ---------------------------------------------------------------------------------------
FORMATS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif"}
MODES = ["L", "RGB", "RGBA", "P", "1", "I;16", "CMYK", "LA"]


@st.composite
def encoded_images(draw):
    """A random valid image in a random mode and format, possibly cut short or bit-flipped."""
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(list(FORMATS)))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    if mode == "I;16":
        img = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        img = img.convert(mode)
    data = b""
    for fmt_try in (fmt, "TIFF"):  # TIFF holds every mode drawn here when fmt cannot
        buf = io.BytesIO()
        try:
            img.save(buf, fmt_try)
        except (OSError, ValueError, KeyError):
            continue
        data = buf.getvalue()
        break
    assert data, f"{mode} could not be encoded"
    damage = draw(st.sampled_from(["none", "cut", "flip"]))
    if damage == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "flip":
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1 :]
    return data, (w, h)


def _loads_or_data_error(path: Path, data: bytes) -> Image.Image | None:
    path.write_bytes(data)
    try:
        out = load_image(path, ImageLimits(min_side=1))
    except DataError as err:
        assert str(path) in str(err)
        return None
    assert out.mode == "RGB"
    return out


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=2048))
def test_fuzz_random_bytes_load_or_raise_data_error(tmp_path, data):
    _loads_or_data_error(tmp_path / "fuzz.png", data)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sample=encoded_images())
def test_fuzz_valid_and_damaged_images_load_or_raise_data_error(tmp_path, sample):
    data, size = sample
    path = tmp_path / "fuzz.img"
    _loads_or_data_error(path, data)
    try:  # the same bytes as a mask
        mask = load_mask(path, size, "image.png", ImageLimits(min_side=1))
    except DataError as err:
        assert str(path) in str(err)
    else:
        assert mask.dtype == bool and mask.shape == size[::-1]


@pytest.mark.e2e  # consumes the session's trained run
def test_results_list_skipped_files(trained_run):
    """The session run has no bad files: the section exists and is empty."""
    results = json.loads((trained_run / "results.json").read_text())
    assert results["counts"]["skipped_files"] == 0
    assert results["data_issues"] == {"skipped_files": [], "orphan_masks": []}
