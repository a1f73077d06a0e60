"""PatchCore pieces: embedding = the paper code's steps, Eq. 7, anomaly maps, checkpoints."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from defectlab.components import (
    AnomalyMapGenerator,
    FeatureExtractor,
    IdentitySampler,
    NativeEmbedder,
    NearestNeighbors,
    PatchEmbedder,
    PixelStatistics,
)
from defectlab.components.embedding import _unfold
from defectlab.errors import ConfigError
from defectlab.models import PatchCore


def _literal_embedding(features, pretrain_dim, target_dim, p=3):
    """The reference code's steps: unfold, resize deeper grids, per-layer and final avg pooling."""
    ref_h, ref_w = features[0].shape[-2:]
    layers = []
    for feat in features:
        b, c, h, w = feat.shape
        unf = F.unfold(feat, kernel_size=p, padding=p // 2).reshape(b, c * p * p, h, w)
        if (h, w) != (ref_h, ref_w):
            unf = F.interpolate(unf, size=(ref_h, ref_w), mode="bilinear", align_corners=False)
        vec = unf.permute(0, 2, 3, 1).reshape(-1, 1, c * p * p)
        layers.append(F.adaptive_avg_pool1d(vec, pretrain_dim).squeeze(1))
    stacked = torch.stack(layers, dim=1).reshape(-1, 1, len(features) * pretrain_dim)
    return F.adaptive_avg_pool1d(stacked, target_dim).reshape(
        features[0].shape[0], ref_h, ref_w, target_dim
    )


@pytest.mark.parametrize("dims", [(64, 32), (200, 48), (50, 48)])  # last: a layer-straddling output
def test_embedder_equals_literal_reference(dims):
    torch.manual_seed(0)
    feats = [
        torch.randn(2, 12, 8, 8, dtype=torch.float64),
        torch.randn(2, 20, 4, 4, dtype=torch.float64),
    ]
    embedder = PatchEmbedder([12, 20], *dims).double()
    ours = embedder(feats).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours, _literal_embedding(feats, *dims), atol=1e-6, rtol=1e-6)


def test_embedder_in_chunks_is_bit_identical():
    torch.manual_seed(0)
    feats = [torch.randn(5, 12, 8, 8), torch.randn(5, 20, 4, 4)]
    whole = PatchEmbedder([12, 20], 64, 32)(feats)
    for chunk in (1, 2, 4):
        parts = PatchEmbedder([12, 20], 64, 32, batch_chunk=chunk)(feats)
        assert torch.equal(parts, whole)
        assert parts.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="model.embed_chunk"):
        PatchEmbedder([12, 20], 64, 32, batch_chunk=0)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_unfold_equals_torch_unfold(size):
    feat = torch.randn(2, 3, 7, 5)
    expected = F.unfold(feat, kernel_size=size, padding=size // 2)
    assert torch.equal(_unfold(feat, size), expected)


class _Identity(torch.nn.Module):
    """Stand-in extractor whose "features" are the input itself (1 layer, 2 channels)."""

    name, layers, weights, channels = "identity", ["x"], None, [2]

    def forward(self, x):
        return [x]


def _patchcore(k: int, bank: torch.Tensor) -> PatchCore:
    model = PatchCore(
        _Identity(),
        IdentitySampler(),
        NearestNeighbors(),
        embedding=partial(NativeEmbedder, patch_size=1),  # the features are the patch vectors
        k=k,
        blur_sigma=0,
    )
    model.fit(bank)
    return model


def test_eq7_reweighting_on_hand_made_case():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -2.0]])
    model = _patchcore(k=2, bank=bank)
    patches = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])  # test patch 1 is the most anomalous
    dist, nn_idx = model._index().search(patches[0], k=1)
    score = model.image_score(dist.view(1, 2), nn_idx.view(1, 2), patches)
    # s* = ||(3,4) - (1,0)|| = sqrt(20); m* = (1,0); N_2(m*) = {(1,0), (0,0)}; ||(3,4)-(0,0)|| = 5
    s = math.sqrt(20)
    expected = (1 - math.exp(s) / (math.exp(s) + math.exp(5.0))) * s
    assert score.item() == pytest.approx(expected, rel=1e-5)
    model.k = 1
    assert model.image_score(dist.view(1, 2), nn_idx.view(1, 2), patches).item() == pytest.approx(s)


def test_patch_neighbors_score_a_patch_by_its_mean_distance_to_the_nearest_rows():
    torch.manual_seed(0)
    bank = torch.randn(40, 2)
    patches = torch.randn(1, 6, 2)
    exact = torch.cdist(patches[0].double(), bank.double()).sort(dim=1).values
    for n in (1, 3):
        model = _patchcore(k=2, bank=bank)
        model.patch_neighbors = n
        scores, image = model.score_patches(patches.view(1, 2, 3, 2))
        torch.testing.assert_close(scores.flatten().double(), exact[:, :n].mean(dim=1))
        # Eq. 7 starts from the most anomalous patch's nearest row m*, whatever n is.
        _, nn_idx = model._index().search(patches[0], k=1)
        expected = model.image_score(scores.view(1, 6), nn_idx.view(1, 6), patches)
        torch.testing.assert_close(image, expected)
    with pytest.raises(ConfigError, match="model.patch_neighbors must be >= 1"):
        PatchCore(_Identity(), IdentitySampler(), NearestNeighbors(), patch_neighbors=0)


def _second_search_score(model, patches):
    """Eq. 7 as computed before the bank neighbours were stored: a second search for N_b(m*)."""
    b, length, d = patches.shape
    dist, nn_idx = model._index().search(patches.reshape(-1, d), k=1)
    scores, idx = dist.view(b, length), nn_idx.view(b, length)
    s_star, p_star = scores.max(dim=1)
    m_star = model.memory_bank[idx.gather(1, p_star[:, None])[:, 0]]
    _, support = model._index().search(m_star, k=model.k)
    m_test = patches[torch.arange(b), p_star][:, None]
    dists = torch.linalg.vector_norm(m_test - model.memory_bank[support], dim=-1)
    return (1 - torch.exp(s_star - torch.logsumexp(dists, dim=1))) * s_star


def test_stored_bank_neighbours_give_the_second_search_score_and_persist():
    torch.manual_seed(0)
    ext = FeatureExtractor("resnet18", ["layer1"], pretrained=False)

    def make(k=4) -> PatchCore:
        return PatchCore(ext, IdentitySampler(), NearestNeighbors(), k=k)  # native: 64-d

    a = make()
    images = torch.rand(4, 3, 32, 32)
    a.fit(a.embed(images[:3]).reshape(-1, 64))
    bank = a.memory_bank
    expected = torch.cdist(bank.double(), bank.double()).argsort(dim=1, stable=True)[:, :4]
    assert torch.equal(a.bank_neighbors, expected)  # each row first, then its nearest
    patches = a.embed(images).reshape(4, -1, 64)
    _, score = a.score_patches(a.embed(images))
    torch.testing.assert_close(score, _second_search_score(a, patches), rtol=0, atol=0)

    state = a.state_dict()
    assert torch.equal(state["bank_neighbors"], expected)
    b = make()  # empty buffers, resized on load
    b.load_state_dict(state)
    assert torch.equal(b.bank_neighbors, expected)
    old = {key: value for key, value in state.items() if key != "bank_neighbors"}
    c = make()  # a checkpoint saved before the neighbours were stored: found again on load
    c.load_state_dict(old)
    assert torch.equal(c.bank_neighbors, expected)
    d = make(k=2)  # another model.k than the checkpoint's: found again for it
    d.load_state_dict(state)
    assert torch.equal(d.bank_neighbors, expected[:, :2])


def test_anomaly_map_shape_and_blur():
    scores = torch.zeros(2, 1, 8, 8)
    scores[0, 0, 4, 4] = 1.0
    plain = AnomalyMapGenerator(sigma=0)(scores, (64, 64))
    blurred = AnomalyMapGenerator(sigma=4)(scores, (64, 64))
    assert plain.shape == blurred.shape == (2, 1, 64, 64)
    torch.testing.assert_close(
        plain, F.interpolate(scores, size=(64, 64), mode="bilinear", align_corners=False)
    )
    assert blurred[0].max() < plain[0].max()  # smoothed peak
    assert blurred[0].sum() == pytest.approx(plain[0].sum().item(), rel=0.02)  # mass kept
    peak = divmod(int(blurred[0].flatten().argmax()), 64)
    assert all(abs(c - 35.5) <= 1 for c in peak)  # centre of patch (4, 4) at stride 8
    assert AnomalyMapGenerator(4).kernel_size == 33  # scipy's truncate=4 radius


@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.5, 4.0])
@pytest.mark.parametrize("grid", [(40, 48), (10, 12), (5, 24)])
def test_map_operators_equal_resize_then_torchvision_blur(sigma, grid):
    torch.manual_seed(0)
    scores = torch.rand(3, 1, *grid, dtype=torch.float64)
    expected = F.interpolate(scores, size=(40, 48), mode="bilinear", align_corners=False)
    if sigma:
        size = [AnomalyMapGenerator(sigma).kernel_size] * 2
        expected = gaussian_blur(expected, kernel_size=size, sigma=[sigma] * 2)
    ours = AnomalyMapGenerator(sigma)(scores, (40, 48))
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=1e-12)


def test_memory_bank_resizes_on_load_and_scores_match():
    torch.manual_seed(0)
    ext = FeatureExtractor("resnet18", ["layer1"], pretrained=False)

    def make() -> PatchCore:
        return PatchCore(
            ext,
            IdentitySampler(),
            NearestNeighbors("auto"),
            k=3,
            embedding=partial(PatchEmbedder, pretrain_embed_dim=16, target_embed_dim=16),
        )

    a = make()
    images = torch.rand(3, 3, 32, 32)
    a.fit(a.embed(images).reshape(-1, 16))
    b = make()
    b.load_state_dict(a.state_dict())
    assert b.memory_bank.shape == a.memory_bank.shape == (3 * 64, 16)
    out_a, out_b = a.predict(images), b.predict(images)
    assert torch.equal(out_a.score, out_b.score) and torch.equal(
        out_a.anomaly_map, out_b.anomaly_map
    )
    # predict_embedded: the same output and the patch features it scored, from one pass.
    out_e, emb = b.predict_embedded(images)
    assert torch.equal(out_e.score, out_b.score) and torch.equal(emb, b.embed(images))
    assert torch.equal(out_e.anomaly_map, out_b.anomaly_map)


def test_pixel_statistics_z_score_the_map_against_held_out_good_images():
    torch.manual_seed(0)
    ext = FeatureExtractor("resnet18", ["layer1"], pretrained=False)

    def make(stats: PixelStatistics | None) -> PatchCore:
        return PatchCore(
            ext, IdentitySampler(), NearestNeighbors("auto"), k=1, pixel_statistics=stats
        )

    train, held_out, test = (
        torch.rand(3, 3, 32, 32),
        torch.rand(4, 3, 32, 32),
        torch.rand(2, 3, 32, 32),
    )
    plain, zs = make(None), make(PixelStatistics(eps=0.5))
    for model in (plain, zs):
        model.fit(model.embed(train).reshape(-1, model.embedder.out_dim))
    with pytest.raises(RuntimeError, match="fit_statistics"):
        zs.predict(test)  # configured but not fitted: no raw numbers passed off as z-scores
    zs.fit_statistics(held_out[i : i + 2] for i in (0, 2))
    raw = plain.predict(held_out).anomaly_map.double()
    mean, std = raw.mean(0), raw.std(0)
    expected = (plain.predict(test).anomaly_map - mean) / (std + 0.5 * std.mean())
    out = zs.predict(test)
    torch.testing.assert_close(out.anomaly_map, expected.float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.score, out.anomaly_map.flatten(1).amax(1))
    # Statistics travel with the state dict (resized on load).
    loaded = make(PixelStatistics(eps=0.5))
    loaded.load_state_dict(zs.state_dict())
    assert torch.equal(loaded.predict(test).score, out.score)


def _native_reference(features, p=3, mode="bilinear"):
    """anomalib's layout, written out: avg-pool each layer, resize to the first grid, concatenate."""
    size = features[0].shape[-2:]
    out = []
    for feat in features:
        pooled = F.avg_pool2d(feat, p, stride=1, padding=p // 2)
        if pooled.shape[-2:] != size:
            pooled = F.interpolate(pooled, size=size, mode=mode, align_corners=False)
        out.append(pooled)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_native_embedder_equals_pool_resize_concat(mode):
    torch.manual_seed(0)
    feats = [torch.randn(3, 12, 8, 8), torch.randn(3, 20, 4, 4)]
    ours = NativeEmbedder([12, 20], interpolation=mode)(feats)
    assert ours.shape == (3, 32, 8, 8)
    torch.testing.assert_close(ours, _native_reference(feats, mode=mode), atol=1e-6, rtol=1e-6)
    for chunk in (1, 2):
        parts = NativeEmbedder([12, 20], interpolation=mode, batch_chunk=chunk)(feats)
        assert torch.equal(parts, ours)


def test_native_embedder_pools_finer_layers_onto_the_chosen_grid():
    torch.manual_seed(0)
    feats = [torch.randn(2, 6, 16, 16), torch.randn(2, 12, 8, 8), torch.randn(2, 20, 4, 4)]
    ours = NativeEmbedder([6, 12, 20], grid_layer=1)(feats)
    assert ours.shape == (2, 38, 8, 8)
    pooled = F.avg_pool2d(feats[0], 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(ours[:, :6], F.avg_pool2d(pooled, 2), atol=1e-6, rtol=1e-6)
    # The other layers are what the default grid gives them when the finest one is left out.
    torch.testing.assert_close(
        ours[:, 6:], NativeEmbedder([12, 20])(feats[1:]), atol=1e-6, rtol=1e-6
    )


def test_native_embedder_projection_is_pca_of_training_features():
    torch.manual_seed(0)
    # 12 + 20 channels whose patch vectors live mostly in a 3-d subspace.
    basis = torch.randn(3, 32)
    coords = torch.randn(4, 8, 8, 3)
    native = coords @ basis + 0.01 * torch.randn(4, 8, 8, 32)
    feats = [
        native[..., :12].permute(0, 3, 1, 2).contiguous(),
        native[..., 12:].permute(0, 3, 1, 2),
    ]
    embedder = NativeEmbedder([12, 20], patch_size=1, dim=3)
    assert embedder.needs_fit and embedder.fit_images == 16
    with pytest.raises(RuntimeError, match="not fitted"):
        embedder(feats)
    embedder.fit(feats)
    reduced = embedder(feats).permute(0, 2, 3, 1).reshape(-1, 3)
    comps = embedder.components
    torch.testing.assert_close(comps.T @ comps, torch.eye(3), atol=1e-5, rtol=0)
    # Three components keep (nearly) all of the distances between patch vectors.
    rows = native.reshape(-1, 32)
    torch.testing.assert_close(
        torch.cdist(reduced[:50], reduced[:50]), torch.cdist(rows[:50], rows[:50]), atol=0.1, rtol=0
    )
    refit = NativeEmbedder([12, 20], patch_size=1, dim=3)
    refit.fit(feats)
    assert torch.equal(refit.components, embedder.components)  # deterministic signs
    restored = NativeEmbedder([12, 20], patch_size=1, dim=3)
    restored.load_state_dict(embedder.state_dict())
    assert not restored.needs_fit and torch.equal(restored(feats), embedder(feats))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"interpolation": "area"}, "embedding.interpolation"),
        ({"dim": 32}, "embedding.dim"),
        ({"dim": 0}, "embedding.dim"),
        ({"patch_size": 2}, "embedding.patch_size"),
        ({"fit_images": 0}, "embedding.fit_images"),
        ({"batch_chunk": 0}, "model.embed_chunk"),
        ({"grid_layer": 2}, "embedding.grid_layer"),
        ({"grid_layer": -1}, "embedding.grid_layer"),
    ],
)
def test_native_embedder_rejects_bad_values(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        NativeEmbedder([12, 20], **kwargs)


def test_embed_batch_auto_is_the_cpu_default_and_bad_values_are_refused():
    from defectlab.models.patchcore import CPU_EMBED_BATCH

    ext = FeatureExtractor("resnet18", ["layer1"], pretrained=False)

    def make(embed_batch) -> PatchCore:
        memory = {"embed_batch": embed_batch}
        return PatchCore(ext, IdentitySampler(), NearestNeighbors("exact"), memory=memory)

    assert make("auto").embed_batch == CPU_EMBED_BATCH == 2  # on CPU
    assert make(5).embed_batch == 5 and make(None).embed_batch is None
    with pytest.raises(ConfigError, match=r"model.memory.embed_batch=fast: use auto"):
        make("fast")
    with pytest.raises(ConfigError, match=r"model.memory.embed_batch must be >= 1"):
        make(0)
    # Slicing the forwards is a speed setting: the features do not depend on it.
    torch.manual_seed(0)
    images = torch.rand(5, 3, 32, 32)
    auto, whole = make("auto"), make(None)
    whole.load_state_dict(auto.state_dict())
    bank = auto.embed(images[:3]).reshape(-1, auto.embedder.out_dim)
    auto.fit(bank)
    whole.fit(bank)
    calls = []
    forward = auto.extractor.forward
    auto.extractor.forward = lambda x: calls.append(len(x)) or forward(x)
    sliced = auto.predict(images)  # backbone in slices of 2, one search of all 5 images
    assert calls == [2, 2, 1]
    full = whole.predict(images)
    assert torch.equal(sliced.score, full.score)
    assert torch.allclose(sliced.anomaly_map, full.anomaly_map, atol=1e-6)
