"""Defect-type classification: region statistics, the classifier, and the job on synthetic data."""

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from defectlab.datasets import SyntheticPreparer
from defectlab.defect_types import (
    REGION_STATS,
    DefectTypeClassifier,
    Descriptors,
    evaluate_splits,
    region_stats,
    run_classification,
)
from defectlab.errors import ConfigError
from defectlab.jobs import run_training

from .conftest import CONF, FAST

pytestmark = pytest.mark.e2e


def _stat(values, name):
    return float(values[REGION_STATS.index(name)])


def test_region_stats_describe_shape_position_and_intensity():
    image = torch.full((3, 64, 64), 0.5)
    line, blob = torch.zeros(64, 64), torch.zeros(64, 64)
    line[10, 4:60] = 1.0  # thin horizontal scratch near the top
    blob[40:52, 40:52] = 1.0  # compact square, lower right, dark
    image[:, 40:52, 40:52] = 0.1
    s_line, s_blob = region_stats(image, line, 0.5), region_stats(image, blob, 0.5)
    assert _stat(s_line, "log_elongation") > 2 > _stat(s_blob, "log_elongation") + 1.5
    assert _stat(s_line, "log_aspect") < -2 and abs(_stat(s_blob, "log_aspect")) < 1e-5
    assert _stat(s_line, "centroid_y") < 0.2 and _stat(s_blob, "centroid_y") > 0.6
    assert _stat(s_blob, "area") == pytest.approx(144 / 64**2)
    assert _stat(s_blob, "intensity_contrast") == pytest.approx(0.1 - 0.5, abs=1e-5)
    # A map that never reaches the threshold still yields a region (its top 1 %).
    assert torch.isfinite(region_stats(image, blob * 0.1, 0.5)).all()


def test_classifier_separates_separable_descriptors_and_reports_chance():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    labels = torch.arange(3).repeat_interleave(6)
    stats = centres[labels] + 0.3 * torch.randn(len(labels), 2, generator=g)
    d = Descriptors([None] * len(labels), None, stats)
    types = ["a", "b", "c"]
    for method in ("prototype", "knn"):
        result = evaluate_splits(d, labels, types, DefectTypeClassifier(method), 2, 5, 0)
        assert result["accuracy"] == 1.0 and result["chance_accuracy"] == pytest.approx(1 / 3)
        assert sum(map(sum, result["confusion"]["counts"])) == 5 * 3 * 4
    # Labels scrambled: nothing to learn, accuracy falls to about chance.
    shuffled = labels[torch.randperm(len(labels), generator=g)]
    noise = evaluate_splits(d, shuffled, types, DefectTypeClassifier(), 2, 20, 0)
    assert noise["accuracy"] < 0.6
    with pytest.raises(ConfigError, match="leaves no query image"):
        evaluate_splits(d, labels, types, DefectTypeClassifier(), 6, 1, 0)
    with pytest.raises(ConfigError, match="method=svm"):
        DefectTypeClassifier("svm")


@pytest.fixture(scope="module")
def typed_run(tmp_path_factory):
    """PatchCore on synthetic brick with 8 defects of each of 3 types (96 px)."""
    root = tmp_path_factory.mktemp("typed")
    SyntheticPreparer(
        categories=("brick",), image_size=96, num_train=24, num_test_good=4, num_test_defect=8
    )(root)
    run = tmp_path_factory.mktemp("typed_run")
    overrides = [f"paths.output_dir={run}", *FAST, f"data.root={root}", "data.category=brick"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    run_training(cfg)
    return run, root


def _classify(make_cfg, run, *overrides, out=None):
    cfg = make_cfg(f"run_dir={run}", *overrides, config="classify_defects", out=out)
    return run_classification(cfg)


@pytest.mark.parametrize("support", [1, 3, "loo"])
def test_defect_types_beat_chance_by_a_wide_margin(support, typed_run, make_cfg, tmp_path):
    run, _ = typed_run
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = tmp_path / "classified"
    result = _classify(make_cfg, run, f"support={support}", "repeats=10", out=out)
    assert result["types"] == ["hole", "scratch", "stain"]
    assert result["chance_accuracy"] == pytest.approx(1 / 3)
    # Chance is 0.33; the synthetic types differ in shape (scratch) and intensity (hole, stain).
    assert result["accuracy"] >= 0.8 and result["macro_f1"] >= 0.75
    assert result["features"]["embedding"] is True
    saved = json.loads((out / "defect_types.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and saved["confusion"] == result["confusion"]
    assert saved["model_file"] == str((run / "checkpoints" / "model.safetensors").resolve())
    assert (out / "plots" / f"defect_types_support_{support}.png").is_file()
    # Evaluation never modifies the training run: same files, same bytes.
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_support_all_predicts_another_folder(typed_run, make_cfg, tmp_path):
    run, root = typed_run
    query = tmp_path / "query"
    for defect_type in ("hole", "scratch", "stain"):
        (query / defect_type).mkdir(parents=True)
        for src in sorted((root / "brick" / "test" / defect_type).glob("00[0-1].png")):
            shutil.copy(src, query / defect_type / src.name)
    result = _classify(make_cfg, run, "support=all", f"query_dir={query}")
    assert len(result["predictions"]) == 6
    # Query images are also in the support set here: nearest prototype must get them right.
    assert result["accuracy"] >= 0.8
    with pytest.raises(ConfigError, match="query_dir="):
        _classify(make_cfg, run, "support=all")


def test_models_without_embeddings_use_region_statistics(make_cfg, synthetic_root, tmp_path):
    run = tmp_path / "cae"
    overrides = [o for o in FAST if not o.startswith("model.")]
    cae = ["model=cae", "model.latent_dim=4", "model.channels=4", "model.depth=2"]
    run_training(
        make_cfg(
            *overrides,
            *cae,
            "system.max_epochs=2",
            f"data.root={synthetic_root}",
            "data.category=brick",
            out=run,
        )
    )
    result = _classify(make_cfg, run, "support=1", "repeats=3")
    assert (
        result["features"]["embedding"] is False and len(result["features"]["region_stats"]) == 10
    )
    assert sum(map(sum, result["confusion"]["counts"])) == 3 * 3 * 3


def test_classify_refuses_models_without_maps_and_bad_support(
    make_cfg, synthetic_root, tmp_path, typed_run
):
    run = tmp_path / "knn"
    overrides = [o for o in FAST if not o.startswith("model.")]
    run_training(
        make_cfg(
            *overrides,
            "model=feature_knn",
            f"data.root={synthetic_root}",
            "data.category=brick",
            out=run,
        )
    )
    with pytest.raises(ConfigError, match="no anomaly map"):
        _classify(make_cfg, run, "support=1")
    with pytest.raises(ConfigError, match="support=0"):
        _classify(make_cfg, typed_run[0], "support=0")


def test_describe_runs_the_backbone_once_per_image(typed_run):
    from defectlab.defect_types import describe
    from defectlab.inference import Predictor

    run, root = typed_run
    predictor = Predictor.from_model(run, "cpu")
    seen = []  # images per extractor forward
    extractor = predictor.system.model.extractor
    handle = extractor.register_forward_hook(lambda _, args, __: seen.append(len(args[0])))
    paths = sorted((root / "brick" / "test" / "hole").glob("*.png"))[:3]
    described = describe(predictor, paths, batch_size=3)
    handle.remove()
    # Each image goes through the backbone once (map and embeddings from the same pass), in
    # slices of the model's embed_batch as the system scores them.
    step = predictor.system.model.embed_batch or 3
    assert seen == [len(s) for s in torch.arange(3).split(step)]
    assert described.embeddings.shape[0] == described.stats.shape[0] == 3
