"""backbone=ensemble: one PatchCore per backbone, members z-scored on held-out good images."""

import pytest
import torch
from safetensors.torch import load_file

from defectlab.components import (
    BackboneEnsemble,
    FeatureExtractor,
    IdentitySampler,
    NearestNeighbors,
)
from defectlab.errors import ConfigError
from defectlab.model_file import read_metadata
from defectlab.models import PatchCore, PatchCoreEnsemble, build_patchcore


def _ensemble() -> PatchCoreEnsemble:
    torch.manual_seed(0)
    backbones = BackboneEnsemble(
        {
            "a": FeatureExtractor("resnet18", ["layer1", "layer2"], pretrained=False),
            "b": FeatureExtractor("resnet18", ["layer2"], pretrained=False),
        }
    )
    return build_patchcore(backbones, IdentitySampler(), NearestNeighbors("torch"), k=3)


def test_build_patchcore_makes_one_member_per_backbone():
    model = _ensemble()
    assert isinstance(model, PatchCoreEnsemble) and list(model.members) == ["a", "b"]
    a, b = model.members.values()
    assert a.knn is not b.knn and a.sampler is not b.sampler  # own, unfitted copies
    assert a.embedder.out_dim == 64 + 128 and b.embedder.out_dim == 128
    assert model.input_multiple == 8 and model.bank_models() == [a, b]
    single = build_patchcore(a.extractor, IdentitySampler(), NearestNeighbors("torch"))
    assert type(single) is PatchCore


def test_members_are_zscored_on_held_out_images_then_averaged():
    model = _ensemble()
    train, held_out, test = (
        torch.rand(3, 3, 32, 32),
        torch.rand(4, 3, 32, 32),
        torch.rand(2, 3, 32, 32),
    )
    for member in model.bank_models():
        member.fit(member.embed(train).reshape(-1, member.embedder.out_dim))
    with pytest.raises(RuntimeError, match="fit_normalization"):
        model.predict(test)
    model.fit_normalization(iter([held_out[:3], held_out[3:]]))  # statistics over batches

    raw_held = model.predict_members(held_out)
    raw_test = model.predict_members(test)
    expected_score, expected_map = 0, 0
    for out, held in zip(raw_test, raw_held, strict=True):
        mean, std = held.score.mean(), held.score.std()
        pixels = held.anomaly_map.double()
        pmean, pstd = pixels.mean(), pixels.std(unbiased=False)
        expected_score = expected_score + (out.score - mean) / std / 2
        expected_map = expected_map + (out.anomaly_map - pmean.float()) / pstd.float() / 2
    out = model.predict(test)
    torch.testing.assert_close(out.score, expected_score, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.anomaly_map, expected_map, rtol=1e-4, atol=1e-4)
    # The held-out images themselves are centred: z-scores average to 0.
    assert abs(float(model.predict(held_out).score.mean())) < 1e-4

    restored = _ensemble()
    restored.load_state_dict(model.state_dict())
    again = restored.predict(test)
    assert torch.equal(again.score, out.score) and torch.equal(again.anomaly_map, out.anomaly_map)


def test_ensemble_needs_two_members_and_held_out_images():
    one = FeatureExtractor("resnet18", ["layer1"], pretrained=False)
    with pytest.raises(ConfigError, match="at least two"):
        BackboneEnsemble({"a": one})
    model = _ensemble()
    for member in model.bank_models():
        member.fit(member.embed(torch.rand(1, 3, 32, 32)).reshape(-1, member.embedder.out_dim))
    with pytest.raises(ConfigError, match="data.val_ratio"):
        model.fit_normalization(iter([torch.rand(1, 3, 32, 32)]))


@pytest.mark.e2e
def test_ensemble_trains_and_tests_from_the_composed_config(make_cfg, synthetic_root):
    from defectlab.jobs import run_training

    from .conftest import FAST

    cfg = make_cfg(
        *FAST,
        f"data.root={synthetic_root}",
        "data.category=brick",
        "backbone=ensemble",
        "~backbone@backbone.members.lite2",  # two members keep the test fast
        "eval.images.max_per_type=0",
        "eval.plots=false",
    )
    results = run_training(cfg)
    assert results["backbone"] == "ensemble"
    assert set(results["memory"]["members"]) == {"lite0", "lite1"}
    assert results["metrics"]["image_auroc"] > 0.9
    assert results["metrics"]["pixel_auroc"] > 0.9

    # The model file: every member's backbone recorded with its own checksum, no frozen weights,
    # every member's bank and Eq. 7 bank neighbours stored (and resizable), the normalisation
    # statistics with them.
    meta = read_metadata(results["model_file"])
    backbones = {b["module"]: b for b in meta["backbones"]}
    assert set(backbones) == {f"model.members.{m}.extractor" for m in ("lite0", "lite1")}
    assert (
        backbones["model.members.lite0.extractor"]["sha256"]
        != (backbones["model.members.lite1.extractor"]["sha256"])
    )
    banks = [f"model.members.{m}.memory_bank" for m in ("lite0", "lite1")]
    neighbours = [f"model.members.{m}.bank_neighbors" for m in ("lite0", "lite1")]
    assert meta["tensors"]["resizable"] == sorted(banks + neighbours)
    stored = load_file(results["model_file"])
    assert not any(".net." in key for key in stored)
    assert {
        *banks,
        *neighbours,
        "model.score_mean",
        "model.map_std",
        "model.normalized",
    } <= stored.keys()


def test_ensemble_without_held_out_images_is_refused_before_any_work(
    make_cfg, synthetic_root, tmp_path
):
    from defectlab.jobs import build_job

    cfg = make_cfg(
        "data=synthetic",
        "data.prepare=null",
        f"data.root={synthetic_root}",
        "backbone=ensemble",
        "data.val_ratio=0",
        "logger=none",
    )
    with pytest.raises(ConfigError, match="data.val_ratio"):
        build_job(cfg, tmp_path)
