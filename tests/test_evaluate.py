"""evaluate.py reproduces training metrics; thresholds never see the test set."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file

from defectlab.datasets import SyntheticPreparer
from defectlab.errors import ConfigError, DataError, ModelFileError
from defectlab.jobs import run_evaluation, run_training
from defectlab.metrics import best_f1_threshold
from defectlab.model_file import load_model

from .conftest import FAST

pytestmark = pytest.mark.e2e


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_evaluate_reproduces_training_metrics_and_leaves_the_run_untouched(
    make_cfg, synthetic_root, tmp_path
):
    run = tmp_path / "run"
    trained = run_training(
        make_cfg(*FAST, f"data.root={synthetic_root}", "data.category=brick", out=run)
    )
    before = _tree_digest(run)

    evaluated = run_evaluation(make_cfg(f"run_dir={run}", config="evaluate", out=tmp_path / "ev"))
    for section in ("metrics", "confusion_matrix", "oracle"):
        for key, value in trained[section].items():
            assert evaluated[section][key] == pytest.approx(value, abs=1e-6), key
    assert evaluated["per_defect_type"].keys() == trained["per_defect_type"].keys()
    assert evaluated["reproduces"]["max_abs_diff"] <= 1e-6
    assert evaluated["threshold"] == trained["threshold"]
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["reproduces"]
    assert (tmp_path / "ev" / "images" / "brick" / "hole").is_dir()
    assert _tree_digest(run) == before  # nothing in the training run changed

    # The same model scores another category (no comparison: other data).
    other = run_evaluation(
        make_cfg(
            f"model_path={run / 'checkpoints' / 'model.safetensors'}",
            "data.category=grass",
            config="evaluate",
            out=tmp_path / "ev2",
        )
    )
    assert other["category"] == "grass" and "reproduces" not in other
    assert other["threshold"]["image_threshold"] == trained["threshold"]["image_threshold"]


def test_evaluate_needs_exactly_one_source(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of run_dir"):
        run_evaluation(make_cfg(config="evaluate"))
    with pytest.raises(ModelFileError, match="no trained model in"):
        run_evaluation(make_cfg(f"run_dir={tmp_path}", config="evaluate"))


REPEATS = "eval.validation_repeats=2"


def test_poisoned_test_set_does_not_move_thresholds(make_cfg, synthetic_root, tmp_path):
    """Replace every test image by noise and add more: calibration and validation metrics
    (what hyper-parameter searches optimise) must not change at all."""
    clean = tmp_path / "clean"
    shutil.copytree(synthetic_root / "brick", clean / "brick")
    val = "eval.validation_anomalies={_target_:defectlab.components.SyntheticAnomalies,probability:1.0}"
    a = run_training(
        make_cfg(
            *FAST, val, REPEATS, f"data.root={clean}", "data.category=brick", out=tmp_path / "a"
        )
    )
    assert a["validation"]["val_synthetic_auroc"] > 0.9  # pasted defects score above clean images
    assert a["validation"]["val_synthetic_pixel_auroc"] > 0.8  # ... and are found where pasted

    poisoned = tmp_path / "poisoned"
    shutil.copytree(clean / "brick", poisoned / "brick")
    rng = np.random.default_rng(0)
    for path in (poisoned / "brick" / "test").rglob("*.png"):
        noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path)
    for i in range(20):  # extra extreme "good" images
        Image.fromarray(np.full((96, 96, 3), 255 * (i % 2), np.uint8)).save(
            poisoned / "brick" / "test" / "good" / f"extra_{i}.png"
        )
    b = run_training(
        make_cfg(
            *FAST, val, REPEATS, f"data.root={poisoned}", "data.category=brick", out=tmp_path / "b"
        )
    )
    assert b["threshold"] == a["threshold"]  # thresholds and normalisation statistics
    assert b["validation"] == a["validation"]
    assert b["counts"]["test"] == a["counts"]["test"] + 20
    assert b["metrics"]["image_auroc"] != a["metrics"]["image_auroc"]


def _labeled_folder(source: Path, category: str, dest: Path) -> Path:
    shutil.copytree(source / category / "test", dest)
    shutil.copytree(source / category / "ground_truth", dest / "ground_truth")
    return dest


def test_f1_val_threshold_comes_from_the_labeled_folder(make_cfg, synthetic_root, tmp_path):
    extra = tmp_path / "extra"
    SyntheticPreparer(
        categories=("brick",),
        image_size=96,
        num_train=1,
        num_test_good=6,
        num_test_defect=3,
        seed=1,
    )(extra)
    val_dir = _labeled_folder(extra, "brick", tmp_path / "val")
    cfg = make_cfg(
        *FAST,
        f"data.root={synthetic_root}",
        "data.category=brick",
        "threshold=f1_val",
        f"data.val_dir={val_dir}",
        out=tmp_path / "run",
    )
    results = run_training(cfg)
    thr = results["threshold"]
    assert thr["strategy"] == "f1_val"

    # Recompute: the best-F1 threshold of the labeled folder's scores, and pixel F1 on its masks.
    system = load_model(results["model_file"]).system
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    loader = datamodule.val_dataloader()[1]
    scores, labels, maps, masks = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            out = system.model.predict(batch["image"])
            scores.append(out.score)
            labels.append(batch["label"])
            maps.append(out.anomaly_map)
            masks.append(batch["mask"])
    expected, _ = best_f1_threshold(torch.cat(scores), torch.cat(labels))
    assert thr["image_threshold"] == pytest.approx(expected, rel=1e-5)
    expected_pixel, _ = best_f1_threshold(torch.cat(maps), torch.cat(masks))
    assert thr["pixel_threshold"] == pytest.approx(expected_pixel, rel=1e-5)


def test_f1_val_refuses_test_images_and_a_missing_folder(make_cfg, synthetic_root, tmp_path):
    leaky = _labeled_folder(synthetic_root, "brick", tmp_path / "leaky")
    base = [*FAST, f"data.root={synthetic_root}", "data.category=brick", "threshold=f1_val"]
    with pytest.raises(DataError, match="identical to test image"):
        run_training(make_cfg(*base, f"data.val_dir={leaky}"))
    with pytest.raises(ConfigError, match="data.val_dir"):
        run_training(make_cfg(*base))


def test_random_init_backbone_is_saved_so_the_checkpoint_reproduces(
    make_cfg, synthetic_root, tmp_path
):
    # A random init cannot be rebuilt from the config: its weights must travel in the checkpoint
    # (a fresh init on load once moved PatchCore scores by 10-30 %).
    run = tmp_path / "run"
    overrides = ["backbone=resnet18", "backbone.pretrained=false", "backbone.layers=[layer2]"]
    trained = run_training(
        make_cfg(*FAST, *overrides, f"data.root={synthetic_root}", "data.category=brick", out=run)
    )
    state = load_file(run / "checkpoints" / "model.safetensors")
    assert any(k.startswith("model.extractor.net.") for k in state)
    torch.manual_seed(12345)  # a different global RNG state than training had
    evaluated = run_evaluation(make_cfg(f"run_dir={run}", config="evaluate", out=tmp_path / "ev"))
    assert evaluated["reproduces"]["max_abs_diff"] <= 1e-6
    assert evaluated["metrics"]["image_auroc"] == trained["metrics"]["image_auroc"]
