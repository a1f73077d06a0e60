"""Feature-kNN baseline: score = mean distance to the k nearest train embeddings; image level only."""

import json

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from defectlab.components import FeatureExtractor, NearestNeighbors
from defectlab.errors import ConfigError
from defectlab.jobs import run_training
from defectlab.model_file import load_model
from defectlab.models import FeatureKNN

from .conftest import FAST

KNN_FAST = [o for o in FAST if not o.startswith("model.")]


def _model(**kwargs):
    extractor = FeatureExtractor("resnet18", ["layer2", "layer3"], pretrained=False)
    return FeatureKNN(extractor, NearestNeighbors("torch"), **kwargs)


@pytest.mark.parametrize("standardize", [False, True])
def test_score_is_mean_distance_to_k_nearest_train_embeddings(standardize):
    torch.manual_seed(0)
    model = _model(k=3, standardize=standardize)
    train, test = torch.rand(7, 3, 64, 64), torch.rand(2, 3, 64, 64)
    emb = model.embed(train)
    assert emb.shape == (7, 128 + 256)  # layer2 + layer3 channels, globally pooled
    model.fit(emb)
    q = model.embed(test)
    if standardize:
        mean, std = emb.mean(0), emb.std(0)
        std[std <= 1e-6] = 1.0  # dead (always-zero) ReLU channels keep unit scale
        emb, q = (emb - mean) / std, (q - mean) / std
    expected = torch.cdist(q, emb).topk(3, largest=False).values.mean(1)
    out = model.predict(test)
    assert out.score == pytest.approx(expected, rel=1e-4)
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    assert (out.anomaly_map == out.score.view(-1, 1, 1, 1)).all()  # flat: no localisation
    assert FeatureKNN.localizes is False


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="model.k"):
        _model(k=0)
    with pytest.raises(ConfigError, match="model.pooling"):
        _model(pooling="median")


@pytest.mark.e2e
def test_feature_knn_end_to_end_reports_pixel_metrics_as_not_applicable(
    make_cfg, synthetic_root, tmp_path
):
    cfg = make_cfg(
        *KNN_FAST,
        "model=feature_knn",
        "model.standardize=true",
        f"data.root={synthetic_root}",
        "data.category=brick",
        "eval.images.max_per_type=1",
    )
    results = run_training(cfg)
    assert results["model"] == "feature_knn" and results["localization"] is False
    assert results["metrics"]["image_auroc"] > 0.7
    for key in ("pixel_auroc", "pixel_aupro", "pixel_f1"):
        assert results["metrics"][key] is None  # masks exist, but the model scores whole images
    assert results["memory"]["bank_shape"] == [results["counts"]["train"], 40 + 112]
    with Image.open(next((tmp_path / "images" / "brick" / "hole").glob("*.png"))) as panel:
        assert panel.size[0] == 96  # the original only: no heatmap for a flat map

    restored = load_model(results["model_file"]).system
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    expected = {
        p["path"]: p["score"] for p in json.loads((tmp_path / "predictions.json").read_text())
    }
    assert restored.model.predict(batch["image"]).score.tolist() == pytest.approx(
        [expected[p] for p in batch["path"]], rel=1e-5
    )


def test_cls_pooling_uses_the_vit_class_token_and_is_refused_for_cnns():
    vit = FeatureExtractor(
        "vit_tiny_patch16_224", ["blocks.11"], pretrained=False, kwargs={"dynamic_img_size": True}
    )
    model = FeatureKNN(vit, NearestNeighbors("torch"), k=1, pooling="cls")
    images = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(model.embed(images), vit.class_tokens(images)[0])
    with pytest.raises(ConfigError, match="model.pooling=cls needs a ViT"):
        _model(pooling="cls")
