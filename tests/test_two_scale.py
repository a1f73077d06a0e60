"""model.scales=two: a fine and a coarse PatchCore bank on one backbone, distances summed."""

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from defectlab.components import (
    BackboneEnsemble,
    FeatureExtractor,
    IdentitySampler,
    NativeEmbedder,
    NearestNeighbors,
    PatchEmbedder,
    PixelStatistics,
    RandomSampler,
)
from defectlab.errors import ConfigError
from defectlab.model_file import read_metadata
from defectlab.models import PatchCore, TwoScalePatchCore, build_patchcore


def _extractor(layers=("layer1", "layer2")) -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor("resnet18", list(layers), pretrained=False)


def _model(**kwargs) -> TwoScalePatchCore:
    return build_patchcore(
        _extractor(), IdentitySampler(), NearestNeighbors("exact"), scales="two", k=1, **kwargs
    )


def _brute(bank: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest-row distances ``(B, 1, h, w)`` of ``(B, C, h, w)`` patch features, in float64."""
    b, c, h, w = grid.shape
    rows = grid.permute(0, 2, 3, 1).reshape(-1, c).double()
    return torch.cdist(rows, bank.double()).amin(1).view(b, 1, h, w).float()


def test_embedder_layers_select_the_backbone_layers_it_uses():
    feats = [torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4)]
    fine = NativeEmbedder([4, 6], layers=[0])
    assert fine.out_dim == 4 and fine(feats).shape == (2, 4, 8, 8)
    torch.testing.assert_close(fine(feats), NativeEmbedder([4])(feats[:1]))
    coarse = NativeEmbedder([4, 6], grid_layer=1)
    assert coarse(feats).shape == (2, 10, 4, 4)
    # The finer layer is pooled then averaged over each 2 x 2 cell of the deeper grid.
    pooled = F.avg_pool2d(F.avg_pool2d(feats[0], 3, 1, 1), 2)
    torch.testing.assert_close(coarse(feats)[:, :4], pooled)
    for bad in ([], [0, 0], [2]):
        with pytest.raises(ConfigError, match="embedding layers"):
            NativeEmbedder([4, 6], layers=bad)


def test_two_banks_share_one_backbone_and_sum_their_distances():
    model = _model()
    assert isinstance(model, TwoScalePatchCore)
    fine, coarse = model.bank_models()
    assert (fine.embedder.out_dim, coarse.embedder.out_dim) == (64, 64 + 128)
    assert fine.extractor is model.extractor is coarse.extractor
    assert fine.knn is not coarse.knn and fine.sampler is not coarse.sampler
    # The backbone is held once: no member's state carries it.
    assert not any(k.startswith("members.") and ".net." in k for k in model.state_dict())

    train, test = torch.rand(3, 3, 64, 64), torch.rand(2, 3, 64, 64)
    for bank in (fine, coarse):
        bank.fit(bank.embed(train).reshape(-1, bank.embedder.out_dim))
    assert model.is_fitted
    out, emb = model.predict_embedded(test)

    features = model.extractor(test)
    near = _brute(fine.memory_bank, fine.embedder(features))  # (2, 1, 16, 16)
    far = _brute(coarse.memory_bank, coarse.embedder(features))  # (2, 1, 8, 8)
    grid = near + F.interpolate(far, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.score, grid.flatten(1).amax(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out.anomaly_map, model.anomaly_map(grid, (64, 64)), atol=1e-4, rtol=1e-4
    )
    assert emb.shape == (2, 8, 8, 64 + 128)  # the coarse features: every layer

    restored = _model()
    restored.load_state_dict(model.state_dict())  # banks resize on load
    again = restored.predict(test)
    assert torch.equal(again.score, out.score) and torch.equal(again.anomaly_map, out.anomaly_map)


def test_two_scales_refuse_settings_they_cannot_honour():
    with pytest.raises(ConfigError, match="model.scales=three"):
        build_patchcore(_extractor(), IdentitySampler(), NearestNeighbors(), scales="three")
    with pytest.raises(ConfigError, match="set model.k=auto or 1"):
        build_patchcore(_extractor(), IdentitySampler(), NearestNeighbors(), scales="two", k=9)
    with pytest.raises(ConfigError, match="at least two backbone.layers"):
        build_patchcore(
            _extractor(["layer2"]), IdentitySampler(), NearestNeighbors(), scales="two", k=1
        )
    with pytest.raises(ConfigError, match="embedding=native"):
        _model(embedding=functools.partial(PatchEmbedder, pretrain_embed_dim=8, target_embed_dim=8))
    for setting in ({"dim": 8}, {"grid_layer": 1}):
        with pytest.raises(ConfigError, match="embedding.dim=null"):
            _model(embedding=functools.partial(NativeEmbedder, **setting))
    ensemble = BackboneEnsemble({"a": _extractor(), "b": _extractor(["layer2"])})
    with pytest.raises(ConfigError, match="takes one backbone"):
        build_patchcore(ensemble, IdentitySampler(), NearestNeighbors(), scales="two", k=1)
    with pytest.raises(ConfigError, match="model.k=nine"):
        build_patchcore(_extractor(), IdentitySampler(), NearestNeighbors(), k="nine")


def test_fine_ratio_sets_the_fine_banks_sampler_alone():
    model = build_patchcore(
        _extractor(), RandomSampler(0.5), NearestNeighbors("exact"), scales="two", fine_ratio=0.25
    )
    fine, coarse = model.bank_models()
    assert (fine.sampler.ratio, coarse.sampler.ratio) == (0.25, 0.5)
    train = torch.rand(3, 3, 64, 64)  # 3 x 16 x 16 fine and 3 x 8 x 8 coarse patches
    for bank in (fine, coarse):
        bank.fit(bank.embed(train).reshape(-1, bank.embedder.out_dim))
    assert (len(fine.memory_bank), len(coarse.memory_bank)) == (192, 96)
    restored = build_patchcore(
        _extractor(), RandomSampler(0.5), NearestNeighbors("exact"), scales="two", fine_ratio=0.25
    )
    restored.load_state_dict(model.state_dict())
    test = torch.rand(2, 3, 64, 64)
    assert torch.equal(restored.predict(test).score, model.predict(test).score)


def test_fine_ratio_is_refused_where_it_cannot_apply():
    for bad in (0, 1.5, True, "half"):
        with pytest.raises(ConfigError, match=f"model.fine_ratio={bad}: a fraction"):
            build_patchcore(
                _extractor(), RandomSampler(0.5), NearestNeighbors(), scales="two", fine_ratio=bad
            )
    with pytest.raises(ConfigError, match="sampler=none keeps every row"):
        _model(fine_ratio=0.5)
    with pytest.raises(ConfigError, match="one bank per backbone"):
        build_patchcore(
            _extractor(), RandomSampler(0.5), NearestNeighbors(), scales="one", fine_ratio=0.5
        )
    with pytest.raises(ConfigError, match="one bank per backbone"):  # auto with Eq. 7: one bank
        build_patchcore(_extractor(), RandomSampler(0.5), NearestNeighbors(), k=9, fine_ratio=0.5)


def test_auto_builds_two_scales_where_they_apply_and_one_bank_elsewhere():
    def built(extractor=None, scales="auto", **kwargs):
        return build_patchcore(
            extractor or _extractor(),
            IdentitySampler(),
            NearestNeighbors(),
            scales=scales,
            **kwargs,
        )

    assert type(built()) is TwoScalePatchCore  # model.k=auto
    assert type(built(k=1)) is TwoScalePatchCore
    paper = functools.partial(PatchEmbedder, pretrain_embed_dim=8, target_embed_dim=8)
    ensemble = BackboneEnsemble({"a": _extractor(), "b": _extractor(["layer2"])})
    for one in (
        built(k=9),  # Eq. 7 asked for: one bank
        built(scales="one"),
        built(embedding=paper),
        built(embedding=functools.partial(NativeEmbedder, dim=8)),
        built(_extractor(["layer2"])),
    ):
        assert type(one) is PatchCore and one.k == 9
    assert built(scales="one", k=3).k == 3
    assert [m.k for m in built(ensemble).members.values()] == [9, 9]
    # A config written before model.scales existed has no such key: one bank, even with k=1.
    old = build_patchcore(_extractor(), IdentitySampler(), NearestNeighbors(), k=1)
    assert type(old) is PatchCore and old.k == 1


@pytest.mark.e2e
def test_two_scales_train_save_and_export_from_the_composed_config(
    make_cfg, synthetic_root, tmp_path
):
    from defectlab.jobs import run_training

    from .conftest import FAST
    from .test_export import _export

    cfg = make_cfg(
        *FAST,
        f"data.root={synthetic_root}",
        "data.category=brick",
        "model.scales=two",  # model.k=auto: unused by two banks
        "eval.images.max_per_type=0",
        "eval.plots=false",
    )
    results = run_training(cfg)
    assert set(results["memory"]["members"]) == {"fine", "coarse"}
    members = results["memory"]["members"]
    assert members["fine"]["train_vectors"] == 4 * members["coarse"]["train_vectors"]
    assert results["metrics"]["image_auroc"] > 0.9
    assert results["metrics"]["pixel_auroc"] > 0.9

    # The model file: one backbone, both banks (resizable), no frozen weights.
    meta = read_metadata(results["model_file"])
    assert [b["module"] for b in meta["backbones"]] == ["model.extractor"]
    banks = [
        f"model.members.{m}.{b}"
        for m in ("fine", "coarse")
        for b in ("memory_bank", "bank_neighbors")
    ]
    assert meta["tensors"]["resizable"] == sorted(banks)
    assert not any(".net." in key for key in load_file(results["model_file"]))

    # Exported: both banks searched exactly in the graph, parity with the loaded model file.
    run = Path(results["model_file"]).parents[1]
    sidecar = _export(make_cfg, run, tmp_path / "export", "torchscript")
    assert sidecar["parity"]["verdicts_equal"]
    assert max(sidecar["parity"]["max_rel_diff"].values()) <= 1e-4


def test_two_scales_z_score_the_summed_map_with_held_out_statistics():
    model = _model(pixel_statistics=PixelStatistics(eps=1.0))
    plain = _model()
    for m in (model, plain):
        for bank in m.bank_models():
            bank.fit(bank.embed(torch.rand(3, 3, 64, 64)).reshape(-1, bank.embedder.out_dim))
    plain.load_state_dict(model.state_dict(), strict=False)  # the same banks
    test = torch.rand(2, 3, 64, 64)
    with pytest.raises(RuntimeError, match="fit_statistics"):
        model.predict(test)
    held_out = torch.rand(4, 3, 64, 64)
    model.fit_statistics(iter([held_out[:2], held_out[2:]]))
    # The component fitted on the plain model's summed held-out maps, applied to its test map.
    statistics = PixelStatistics(eps=1.0)
    statistics.fit(iter([plain.predict(held_out).anomaly_map]))
    out = model.predict(test)
    expected = statistics(plain.predict(test).anomaly_map)
    torch.testing.assert_close(out.anomaly_map, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.score, expected.flatten(1).amax(1), rtol=1e-4, atol=1e-4)
