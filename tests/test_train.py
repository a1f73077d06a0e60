"""End to end: the composed config trains, tests, saves and reloads PatchCore."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from defectlab.build import build
from defectlab.errors import ConfigError
from defectlab.jobs import build_job
from defectlab.metrics import ThresholdSpec
from defectlab.model_file import load_model

from .conftest import FAST, ROOT
from .wandb_offline import read_run

pytestmark = pytest.mark.e2e


def test_config_composes_with_every_backbone_and_sampler(make_cfg):
    for backbone in [
        "wide_resnet50_2",
        "resnet18",
        "resnet50",
        "efficientnet_b5",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "mobilenet_v2",
    ]:
        for sampler in ["coreset", "random", "none"]:
            cfg = make_cfg(f"backbone={backbone}", f"sampler={sampler}", "model.k=1")
            assert cfg.model.extractor.alias == backbone and cfg.model.k == 1


# The session's trained run (conftest.trained_run: PatchCore, synthetic brick, 96 px) is checked
# one property per test, so one failure does not hide the others.


@pytest.fixture(scope="module")
def results(trained_run):
    return json.loads((trained_run / "results.json").read_text())


def test_patchcore_detects_and_localises_synthetic_defects(results):
    metrics = results["metrics"]
    assert metrics["image_auroc"] > 0.95
    assert metrics["pixel_auroc"] > 0.9 and metrics["pixel_aupro"] > 0.6
    assert metrics["image_auroc_ci_low"] <= metrics["image_auroc"] <= metrics["image_auroc_ci_high"]
    for key in ("image_aupr", "image_f1", "image_precision", "image_recall", "pixel_f1"):
        assert 0 <= metrics[key] <= 1, key
    assert "image_f1_max" not in metrics and results["oracle"]["image_f1_max"] > 0.9


def test_counts_confusion_matrix_and_defect_types_agree(results):
    cm = results["confusion_matrix"]
    assert cm["tp"] + cm["fn"] == results["counts"]["test_defective"]
    assert sum(cm.values()) == results["counts"]["test"]
    assert set(results["per_defect_type"]) == {
        "brick/good",
        "brick/hole",
        "brick/scratch",
        "brick/stain",
    }
    assert results["per_defect_type"]["brick/hole"]["n"] == 4


def test_results_record_the_run_its_costs_and_bank(results):
    assert (results["category"], results["model"], results["backbone"]) == (
        "brick",
        "patchcore",
        "efficientnet_lite0",
    )
    assert results["timing"]["fit_s"] > 0 and results["timing"]["test_images_per_s"] > 0
    assert results["memory"]["peak_rss_mb"] > 0
    # Two banks (model.scales=auto): ceil(10 %) of the fine patches (96 px at stride 8, lite0
    # blocks.2: 40 channels) and of the coarse ones (stride 16, blocks.2 + blocks.4 = 40 + 112).
    fine, coarse = (results["counts"]["train"] * side**2 for side in (12, 6))
    memory = results["memory"]
    assert memory["bank_shapes"] == [[-(-fine // 10), 40], [-(-coarse // 10), 152]]
    assert memory["bank_shape"] is None  # set for one bank only
    assert memory["bank_mb"] == pytest.approx(
        sum(r * d for r, d in memory["bank_shapes"]) * 4 / 2**20
    )


def test_thresholds_are_held_out_statistics_and_decide_predictions(results, trained_run):
    thr = results["threshold"]
    assert thr["strategy"] == "percentile" and thr["normalization"] == "threshold"
    assert thr["image_threshold_normalized"] == pytest.approx(1.0)
    predictions = json.loads((trained_run / "predictions.json").read_text())
    for p in predictions:
        assert p["predicted"] == int(p["score"] >= thr["image_threshold"])
        assert p["predicted"] == int(p["score_normalized"] >= 1 - 1e-9)


def test_panels_and_plots_are_written(results, trained_run):
    max_per_type = results["eval"]["images"]["max_per_type"]
    written = 0
    for folder, n in [("good", 8), ("hole", 4), ("scratch", 4), ("stain", 4)]:
        pngs = list((trained_run / "images" / "brick" / folder).glob("*.png"))
        assert len(pngs) == min(n, max_per_type), folder
        written += len(pngs)
    with Image.open(pngs[0]) as panel:
        assert panel.size[0] == 4 * 96  # original | heatmap | overlay | segmentation
    assert results["images"]["written"] == written
    for name in ("roc", "pr", "score_histogram", "confusion", "per_defect_type"):
        assert Path(results["plots"][name]).is_file(), name


def test_model_file_alone_restores_scores_and_labels(
    results, trained_run, make_cfg, synthetic_root
):
    """The model file (no backbone weights inside) restores identical scores and labels."""
    path = Path(results["model_file"])
    assert path == trained_run / "checkpoints" / "model.safetensors"
    assert not any(k.startswith("model.extractor.net.") for k in load_file(path))
    restored = load_model(path).system
    assert restored.calibration.normalization == "threshold"
    datamodule = instantiate(make_cfg(*FAST, f"data.root={synthetic_root}").data)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    out = restored.predict_step(batch, 0)
    predictions = json.loads((trained_run / "predictions.json").read_text())
    expected = {p["path"]: p for p in predictions}
    assert out["score"].tolist() == pytest.approx(
        [expected[p]["score"] for p in batch["path"]], rel=1e-6
    )
    assert out["is_defective"].long().tolist() == [expected[p]["predicted"] for p in batch["path"]]
    assert out["segmentation"].shape == batch["mask"].shape


def test_train_cli_with_wandb_offline(synthetic_root, tmp_path):
    """The real entry point, with the wandb logger running offline (no network, no API key)."""
    out = tmp_path / "run"
    overrides = list(FAST)  # logger=wandb below wins over the preset's logger=none
    cmd = [
        sys.executable,
        "train.py",
        *overrides,
        f"data.root={synthetic_root}",
        "data.category=grass",
        "logger=wandb",
        "model.k=1",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image_auroc" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["image_auroc"] > 0.9
    assert (out / ".hydra" / "config.yaml").is_file() and (
        out / "checkpoints" / "model.safetensors"
    ).is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list(runs[0].glob("files/media/images/plots/roc*.png"))  # plots reach the logger
    assert f"wandb sync {runs[0]}" in proc.stdout  # says how to upload later

    # What the run file holds: every test metric, costs, the per-type table, example panels.
    logged = read_run(runs[0])
    summary = logged["summary"]
    for key, value in results["metrics"].items():
        assert summary[f"test/{key}"] == pytest.approx(value), key
    assert summary["timing/fit_s"] == pytest.approx(results["timing"]["fit_s"])
    assert summary["memory/peak_rss_mb"] > 0
    assert (
        summary["per_defect_type/_type"] == "table-file" and summary["per_defect_type/nrows"] == 4
    )
    assert summary["examples/hole/count"] >= 1 and summary["examples/hole/_type"].startswith(
        "images"
    )
    assert logged["job_type"] == "patchcore" and logged["group"] == ""  # single run: no group
    assert logged["config"]["model"]["k"] == 1 and logged["config"]["data"]["category"] == "grass"

    # evaluate.py on the run folder: a new folder, the same metrics.
    ev = tmp_path / "ev"
    cmd = [sys.executable, "evaluate.py", f"run_dir={out}", f"hydra.run.dir={ev}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |difference| over all metrics = 0" in proc.stdout
    assert json.loads((ev / "results.json").read_text())["metrics"] == results["metrics"]


def test_bad_config_value_fails_before_heavy_work(make_cfg, tmp_path):
    """Config errors surface as the project's own error, unwrapped from Hydra's, at build time."""
    cfg = make_cfg("sampler.ratio=1.5", "data=synthetic")
    with pytest.raises(ConfigError, match="sampler.ratio must be in"):
        build(cfg.model)
    with pytest.raises(ConfigError, match=r"backbone.layers: \['layer9'\]"):
        build(make_cfg("backbone=resnet18", "backbone.layers=[layer9]").model)
    for override, key in [
        ("eval.normalization=zscore", "eval.normalization=zscore"),
        ("eval.max_fpr=0", "eval.max_fpr"),
        ("eval.validation_repeats=0", "eval.validation_repeats"),
        ("eval.bootstrap.confidence=95", "eval.bootstrap.confidence"),
        ("eval.images.max_per_type=-1", "eval.images.max_per_type"),
        ("threshold.percentile=101", "threshold.percentile"),
        ("threshold=fixed", "threshold.value must be set"),
    ]:
        with pytest.raises(ConfigError, match=key):
            build_job(make_cfg("data=synthetic", override), tmp_path)


def test_every_threshold_strategy_composes(make_cfg):
    for name, extra in [("percentile", []), ("sigma", []), ("fixed", ["threshold.value=2.5"])]:
        cfg = make_cfg(f"threshold={name}", *extra)
        assert ThresholdSpec(**OmegaConf.to_container(cfg.threshold)).strategy == name
    cfg = make_cfg("threshold=f1_val", "data.val_dir=/some/folder")
    assert cfg.threshold.strategy == "f1_val" and cfg.data.val_dir == "/some/folder"
