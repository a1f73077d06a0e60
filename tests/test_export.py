"""export.py: ONNX and TorchScript files reproduce the trained model, pre-processing included."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from defectlab import export
from defectlab.components.resize import ExactResize
from defectlab.data import image_tensor
from defectlab.errors import ConfigError, DataError, ExportError
from defectlab.export import Artefact, export_run
from defectlab.imageio import load_image
from defectlab.inference import Predictor, expand_input

pytestmark = pytest.mark.e2e

# Frames of another size than the model input, so the exported resize is exercised.
FRAME = (131, 117)


@pytest.mark.parametrize(
    ("in_size", "out_size"),
    [((300, 300), (224, 224)), ((131, 117), (96, 96)), ((64, 80), (96, 96)), ((96, 50), (96, 96))],
)
def test_exact_resize_is_bit_identical_to_torchvision(in_size, out_size):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, 3, *in_size), dtype=torch.uint8, generator=generator)
    expected = torch.stack(
        [v2.Resize(out_size, antialias=True)(tv_tensors.Image(x)) for x in noise]
    )
    assert torch.equal(ExactResize(in_size, out_size)(noise), expected)


def _frames(synthetic_root, folder):
    """The run's real test images, resized to FRAME, saved as PNGs the way a camera delivers."""
    folder.mkdir()
    for path in sorted((synthetic_root / "brick" / "test").glob("*/00[0-2].png")):
        image = Image.open(path).convert("RGB").resize(FRAME[::-1], Image.BICUBIC)
        image.save(folder / f"{path.parent.name}_{path.name}")
    return expand_input(str(folder))


def _reference(predictor, paths):
    images = torch.stack([predictor.load(p) for p in paths])
    return predictor.score(images, [str(p) for p in paths])


def _export(make_cfg, run, out, fmt, *overrides):
    cfg = make_cfg(f"run_dir={run}", f"format={fmt}", f"out_dir={out}", *overrides, config="export")
    return export_run(cfg)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_the_trained_model(fmt, make_cfg, trained_run, synthetic_root, tmp_path):
    frames = _frames(synthetic_root, tmp_path / "frames")
    extra = [f"input_size=[{FRAME[0]},{FRAME[1]}]"] if fmt == "onnx" else []
    sidecar = _export(make_cfg, trained_run, tmp_path / "out", fmt, *extra)

    path = tmp_path / "out" / sidecar["file"]
    assert yaml.safe_load((tmp_path / "out" / f"{path.name}.yaml").read_text()) == sidecar
    assert sidecar["sha256"] == export._sha256(path)
    predictor = Predictor.from_model(trained_run, "cpu")
    assert sidecar["threshold"] == predictor.system.calibration.as_dict()
    banks = [m.memory_bank for m in predictor.system.model.bank_models()]  # fine and coarse
    assert sidecar["memory_bank_shapes"] == [list(b.shape) for b in banks]
    assert sidecar["memory_bank_rows"] == sum(len(b) for b in banks)
    assert sidecar["input"]["size"] == (
        list(FRAME) if fmt == "onnx" else "any (one size per batch)"
    )
    # export.py's own check: the run's test images (as FRAME-sized frames for ONNX)
    assert sidecar["parity"]["images"] == 8 and sidecar["parity"]["verdicts_equal"]
    assert max(sidecar["parity"]["max_rel_diff"].values()) <= 1e-4

    # One batch of real frames through the file vs the Lightning model, 1e-4 or better.
    artefact = Artefact(path)
    got = artefact(np.stack([image_tensor(load_image(p)).numpy() for p in frames]))
    ref = _reference(predictor, frames)
    assert set(ref["is_defective"].tolist()) == {False, True}  # both verdicts are exercised
    np.testing.assert_allclose(got["score"], ref["score"].numpy(), rtol=1e-4)
    np.testing.assert_allclose(got["score_normalized"], ref["score_normalized"].numpy(), atol=1e-4)
    np.testing.assert_allclose(got["anomaly_map"], ref["anomaly_map"].numpy(), atol=1e-4)
    np.testing.assert_array_equal(got["is_defective"], ref["is_defective"].numpy())
    assert (got["segmentation"] == ref["segmentation"].numpy()).mean() > 0.999
    assert got["score_normalized"].dtype == np.float64 and got["is_defective"].dtype == np.bool_


def test_onnx_export_of_a_run_with_brightness_keeps_parity(make_cfg, trained_run_bright, tmp_path):
    sidecar = _export(make_cfg, trained_run_bright, tmp_path / "out", "onnx", "parity_images=4")
    assert sidecar["input"]["preprocessing"]["brightness"] == 0.4
    assert sidecar["parity"]["images"] == 4 and sidecar["parity"]["verdicts_equal"]
    assert max(sidecar["parity"]["max_rel_diff"].values()) <= 1e-4


def test_onnx_refuses_frames_of_another_size(make_cfg, trained_run, tmp_path):
    _export(make_cfg, trained_run, tmp_path, "onnx", "parity_images=2")
    artefact = Artefact(tmp_path / "model.onnx")
    with pytest.raises(DataError, match=r"takes images of height x width 96 x 96, got 97 x 96"):
        artefact(np.zeros((1, 3, 97, 96), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        artefact(np.zeros((1, 3, 96, 96), dtype=np.float32))


def test_failed_parity_writes_nothing_and_keeps_the_earlier_file(
    make_cfg, trained_run, tmp_path, monkeypatch
):
    _export(make_cfg, trained_run, tmp_path, "torchscript", "parity_images=1")
    before = (tmp_path / "model.pt").read_bytes()
    bad = {"images": 1, "max_rel_diff": {"score": 0.5, "anomaly_map": 0.0}, "verdicts_equal": True}
    monkeypatch.setattr(export, "measure_parity", lambda *args: bad)
    with pytest.raises(ExportError, match="disagrees with the trained model"):
        _export(make_cfg, trained_run, tmp_path, "torchscript", "parity_images=1")
    assert (tmp_path / "model.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.yaml"]


def test_export_config_errors(make_cfg, trained_run, tmp_path):
    with pytest.raises(ConfigError, match="format=tflite"):
        _export(make_cfg, trained_run, tmp_path, "tflite")
    with pytest.raises(ConfigError, match="input_size"):
        _export(make_cfg, trained_run, tmp_path, "onnx", "input_size=[96]")
    with pytest.raises(ConfigError, match="opset"):
        _export(make_cfg, trained_run, tmp_path, "onnx", "opset=17")
