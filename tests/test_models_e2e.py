"""Every model end to end through the same config, DataModule, metrics and results."""

import json
import shutil

import pytest

from defectlab.errors import ConfigError, DataError
from defectlab.export import export_run
from defectlab.jobs import build_job, run_evaluation, run_training
from defectlab.model_file import read_metadata

from .conftest import FAST

pytestmark = pytest.mark.e2e

DATA = [o for o in FAST if not o.startswith("model.")]
# Tiny networks and two epochs: the path, not the accuracy, is under test here.
TRAINED = ["model.channels=4", "model.depth=2", "system.max_epochs=2"]
MODELS = {
    "patchcore": ["model=patchcore"],
    "feature_knn": ["model=feature_knn"],
    "cae": ["model=cae", "model.latent_dim=4", *TRAINED],
    "unet": ["model=unet", "model.decoder_channels=8", *TRAINED],
    # experiment=unet_fast's decoder: per-patch head, noise on whole feature maps only
    "unet_patch": [
        "model=unet",
        "model.decoder=patch",
        "model.decoder_channels=8",
        "model.feature_noise.min_area=1.0",
        "model.feature_noise.max_area=1.0",
        "system.anomalies=null",
        *TRAINED,
    ],
}


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_trains_tests_and_reproduces(model, make_cfg, synthetic_root, tmp_path):
    run = tmp_path / "run"
    overrides = [*DATA, *MODELS[model], f"data.root={synthetic_root}", "data.category=brick"]
    results = run_training(make_cfg(*overrides, "eval.images.max_per_type=1", out=run))
    name = model.removesuffix("_patch")

    assert results["model"] == name
    metrics = results["metrics"]
    assert 0 <= metrics["image_auroc"] <= 1 and metrics["image_f1"] is not None
    localizes = model != "feature_knn"
    assert results["localization"] is localizes
    for key in ("pixel_auroc", "pixel_aupro", "pixel_f1"):
        assert (metrics[key] is not None) is localizes, key
    assert results["counts"]["test"] == 8 + 3 * 4
    assert results["backbone"] == (None if model == "cae" else "efficientnet_lite0")
    assert (run / "checkpoints" / "model.safetensors").is_file()
    if name == "unet":  # its frozen pretrained encoder is rebuilt from the config, not stored
        meta = read_metadata(run / "checkpoints" / "model.safetensors")
        assert [b["stored_in_file"] for b in meta["backbones"]] == [False]
    assert len(list((run / "images" / "brick" / "hole").glob("*.png"))) == 1
    assert json.loads((run / "results.json").read_text())["metrics"] == metrics

    if name in ("cae", "unet"):
        training = results["training"]
        assert training["epochs"] == len(training["val_loss_history"]) == 2
        best = training["best_epoch"]
        assert training["best_val_loss"] == min(training["val_loss_history"])
        assert training["val_loss_history"][best - 1] == training["best_val_loss"]
        # The saved and tested model is the best epoch's; Lightning's checkpoint stays for resuming.
        assert read_metadata(run / "checkpoints" / "model.safetensors")["training"]["epoch"] == best
        assert (run / "checkpoints" / "best.ckpt").is_file()

    # The model file alone reproduces every metric in a new folder.
    evaluated = run_evaluation(make_cfg(f"run_dir={run}", config="evaluate", out=tmp_path / "ev"))
    assert evaluated["reproduces"]["max_abs_diff"] <= 1e-6

    # ...and exports to one ONNX file that reproduces it (export_run raises beyond 1e-4).
    exported = export_run(
        make_cfg(
            f"run_dir={run}", f"out_dir={tmp_path / 'onnx'}", "parity_images=4", config="export"
        )
    )
    assert exported["model"] == name and exported["parity"]["images"] == 4
    assert exported["parity"]["verdicts_equal"]


def test_unet_with_real_labeled_defects_reports_and_removes_them(
    make_cfg, synthetic_root, tmp_path
):
    overrides = [*DATA, *MODELS["unet"], f"data.root={synthetic_root}", "data.category=grass"]
    results = run_training(make_cfg(*overrides, "data.labeled_anomalies=1"))
    assert results["counts"]["labeled_anomalies"] == {"hole": 1, "scratch": 1, "stain": 1}
    assert results["counts"]["train"] == 22 + 3  # fit slice of train/good + the moved defects
    assert results["counts"]["test"] == 8 + 3 * 3
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len({p["path"] for p in predictions}) == 17  # the moved images are not tested
    for defect_type in ("hole", "scratch", "stain"):
        assert sum(p["defect_type"] == defect_type for p in predictions) == 3


def test_labeled_defects_are_refused_where_they_would_be_wrong(make_cfg, synthetic_root, tmp_path):
    base = [*DATA, f"data.root={synthetic_root}", "data.category=grass"]
    for model in ("patchcore", "cae"):  # unsupervised: defects must never enter their training
        with pytest.raises(ConfigError, match="data.labeled_anomalies"):
            build_job(make_cfg(*base, *MODELS[model], "data.labeled_anomalies=1"), tmp_path)
    with pytest.raises(DataError, match="at least one per type must stay"):
        job = build_job(make_cfg(*base, *MODELS["unet"], "data.labeled_anomalies=4"), tmp_path)
        job.datamodule.setup()

    no_masks = tmp_path / "nomasks"
    shutil.copytree(synthetic_root / "grass", no_masks / "grass")
    shutil.rmtree(no_masks / "grass" / "ground_truth")
    overrides = [*DATA, *MODELS["unet"], f"data.root={no_masks}", "data.category=grass"]
    with pytest.raises(DataError, match="needs defect masks"):
        job = build_job(make_cfg(*overrides, "data.labeled_anomalies=1"), tmp_path)
        job.datamodule.setup()


def test_trained_models_need_a_held_out_slice(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="data.val_ratio must be > 0"):
        build_job(make_cfg(*DATA, *MODELS["cae"], "data.val_ratio=0"), tmp_path)


def test_presets_and_vit_compose(make_cfg):
    cae = make_cfg("experiment=cae_fast")
    assert (cae.model_name, cae.data.image_size) == ("cae", 128)
    # a step budget, as the U-Net's: 36-image textures train as long as ELPV mono
    assert (cae.trainer.min_steps, cae.trainer.max_steps) == (300, 600)
    unet = make_cfg("experiment=unet_fast", "data=synthetic", "data.category=grass")
    assert unet.model_name == "unet" and unet.model.decoder == "patch"
    assert unet.data.root.endswith("synthetic")
    assert unet.system.anomalies is None  # the patch decoder learns from feature noise alone
    noise = unet.model.feature_noise
    assert (noise.probability, noise.std, noise.min_area, noise.max_area) == (1.0, 0.25, 1.0, 1.0)
    assert (unet.model.decoder_channels, unet.model.score, unet.data.batch_size) == (256, "max", 8)
    assert not unet.model.flip_average and unet.model.pixel_statistics is None
    assert (unet.system.optimizer.lr, unet.system.lr_schedule) == (2e-4, "constant")
    assert (unet.trainer.min_steps, unet.trainer.max_steps) == (750, 1500)
    assert list(unet.backbone.layers) == ["blocks.2", "blocks.4"]
    conv = make_cfg("experiment=unet_conv_fast", "data=synthetic", "data.category=grass")
    assert conv.model.decoder == "unet" and conv.system.anomalies.kinds
    assert conv.system.anomalies.exclude_textures == ["grass"]  # never the product's texture
    assert (conv.trainer.min_steps, conv.trainer.max_steps) == (300, 600)
    assert (conv.system.lr_schedule, cae.system.lr_schedule) == ("cosine", "constant")
    assert list(conv.backbone.layers) == ["blocks.1", "blocks.2", "blocks.4"]  # stride-4 skip
    assert conv.model.flip_average and conv.model.pixel_statistics.eps == 1.0
    assert make_cfg().trainer.max_epochs == 1  # memory banks: one pass
    vit = make_cfg("backbone=vit_base_patch16_224", "model=feature_knn", "model.pooling=cls")
    assert vit.model.extractor.kwargs.dynamic_img_size is True


def test_statistics_and_thresholds_are_fitted_once_for_the_kept_epoch(
    make_cfg, synthetic_root, tmp_path, monkeypatch
):
    import torch

    from defectlab.models import UNet

    scored: list[int] = []
    predict = UNet.predict
    monkeypatch.setattr(UNet, "predict", lambda m, x: scored.append(len(x)) or predict(m, x))
    stats = "model.pixel_statistics={_target_:defectlab.components.PixelStatistics,eps:1.0}"
    overrides = [*DATA, *MODELS["unet"], "system.max_epochs=3", "model.flip_average=true", stats]
    root = [f"data.root={synthetic_root}", "data.category=brick"]
    job = build_job(make_cfg(*overrides, *root, out=tmp_path / "run"), tmp_path / "run")
    report = job.system.fit(job.trainer, job.datamodule)
    system, model = job.system, job.system.model
    assert report.training.epochs == 3 and model.pixel_statistics.fitted

    # The kept weights are the best epoch's checkpoint...
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    assert report.training.best_epoch == best["epoch"] + 1
    state = best["state_dict"].items()  # statistics and calibration are refitted below
    weights = {k: v for k, v in state if k.startswith("model.") and "pixel_statistics" not in k}
    assert weights
    for key, value in weights.items():
        assert torch.equal(system.state_dict()[key], value), key
    # ...its statistics are those of these weights on the good training images...
    mean, std = model.pixel_statistics.mean.clone(), model.pixel_statistics.std.clone()
    model.fit_statistics(b["image"] for b in job.datamodule.train_dataloader())
    assert torch.allclose(model.pixel_statistics.mean, mean, atol=1e-7)
    assert torch.allclose(model.pixel_statistics.std, std, atol=1e-7)
    # ...and fit scored the held-out images for one calibration, not once per epoch.
    during_fit, threshold = sum(scored), float(system.calibration.image_threshold)
    scored.clear()
    system.validate(job.trainer, job.datamodule)
    assert during_fit == sum(scored) > 0
    assert float(system.calibration.image_threshold) == threshold
