"""Perlin masks, texture / self-image fills and feature-space noise (components/)."""

import pytest
import torch

from defectlab.components import PixelStatistics, SyntheticAnomalies
from defectlab.components.feature_anomaly import FeatureNoise
from defectlab.components.perlin import perlin_mask, perlin_noise
from defectlab.components.synthetic_anomaly import TEXTURES, load_textures
from defectlab.errors import ConfigError


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (37, 29)])
def test_perlin_noise_is_smooth_bounded_and_seeded(shape):
    noise = perlin_noise(*shape, (4, 2), torch.Generator().manual_seed(0))
    assert noise.shape == shape and noise.abs().max() <= 1.0 + 1e-6
    assert noise.std() > 0.05  # not flat
    # Smooth: neighbouring pixels differ far less than the noise varies overall.
    assert (noise[:, 1:] - noise[:, :-1]).abs().mean() < noise.std() / 4
    again = perlin_noise(*shape, (4, 2), torch.Generator().manual_seed(0))
    assert torch.equal(noise, again)


@pytest.mark.parametrize("area", [0.005, 0.05, 0.3])
def test_perlin_mask_is_binary_with_the_drawn_area(area):
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        mask = perlin_mask(64, 96, area, g, min_cells=2, max_cells=16)
        assert mask.shape == (1, 64, 96)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert mask.mean().item() == pytest.approx(area, abs=2 / (64 * 96) + 1e-3)
    a = perlin_mask(32, 32, 0.1, torch.Generator().manual_seed(5))
    b = perlin_mask(32, 32, 0.1, torch.Generator().manual_seed(5))
    c = perlin_mask(32, 32, 0.1, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_textures_load_offline_as_rgb_in_unit_range():
    textures = load_textures(["brick", "coffee"])
    for t in textures:
        assert t.ndim == 3 and t.shape[0] == 3 and t.min() >= 0 and t.max() <= 1
    assert len(TEXTURES) == len(set(TEXTURES))


@pytest.mark.parametrize("kind", ["perlin_texture", "perlin_self"])
def test_perlin_kinds_fill_exactly_the_masked_pixels(kind):
    torch.manual_seed(0)
    images = torch.rand(4, 3, 48, 48) * 0.5 + 0.25
    source = SyntheticAnomalies(kinds=[kind], probability=1.0, min_area=0.02, max_area=0.1)
    out, masks = source(images, torch.Generator().manual_seed(2))
    areas = masks.flatten(1).mean(1)
    assert ((areas > 0.02 - 1e-3) & (areas < 0.1 + 1e-3)).all()
    changed = (out != images).any(dim=1, keepdim=True)
    assert not (changed & (masks == 0)).any()
    assert changed[masks == 1].float().mean() > 0.9
    again, again_masks = source(images, torch.Generator().manual_seed(2))
    assert torch.equal(again, out) and torch.equal(again_masks, masks)


def test_grayscale_images_get_grayscale_fills():
    images = torch.rand(3, 1, 40, 40).expand(-1, 3, -1, -1).contiguous()
    source = SyntheticAnomalies(kinds=["perlin_texture"], probability=1.0, min_area=0.05)
    out, _ = source(images, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_texture_exclusion_and_bad_values():
    source = SyntheticAnomalies(kinds=["perlin_texture"], exclude_textures=["brick"])
    assert "brick" not in source.texture_names and "grass" in source.texture_names
    with pytest.raises(ConfigError, match="no texture is left"):
        SyntheticAnomalies(kinds=["perlin_texture"], textures=["brick"], exclude_textures=["brick"])
    with pytest.raises(ConfigError, match="anomalies.textures"):
        SyntheticAnomalies(textures=["dtd"])
    with pytest.raises(ConfigError, match="min_opacity"):
        SyntheticAnomalies(min_opacity=0)


def test_existing_kinds_unchanged_by_the_new_ones():
    """Validation synthetic AUROC depends on these draws: a seed must give the same defects."""
    images = torch.rand(8, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    out, masks = SyntheticAnomalies(probability=1.0)(images, torch.Generator().manual_seed(3))
    # Fingerprint taken on commit 971e913, before the perlin kinds were added.
    assert masks.flatten(1).sum(1).tolist() == [11, 25, 52, 71, 80, 104, 28, 52]
    assert out.sum().item() == pytest.approx(27631.798828125, rel=1e-6)


def test_feature_noise_perturbs_only_inside_the_mask():
    features = [torch.zeros(4, 8, 16, 16), torch.zeros(4, 16, 8, 8)]
    noise = FeatureNoise(probability=1.0, std=1.0, min_area=0.1, max_area=0.3, seed=0)
    noisy, masks = noise(features)
    assert masks.shape == (4, 1, 16, 16)
    areas = masks.flatten(1).mean(1)
    assert ((areas > 0.1 - 0.01) & (areas < 0.3 + 0.01)).all()
    assert torch.equal(noisy[0] != 0, masks.bool().expand(-1, 8, -1, -1))
    coarse = torch.nn.functional.interpolate(masks, size=(8, 8), mode="nearest").bool()
    assert torch.equal(noisy[1] != 0, coarse.expand(-1, 16, -1, -1))
    assert noisy[0][masks.bool().expand(-1, 8, -1, -1)].std() == pytest.approx(1.0, rel=0.1)
    again, _ = noise(features, torch.Generator().manual_seed(4))
    same, _ = noise(features, torch.Generator().manual_seed(4))
    assert torch.equal(again[0], same[0])
    with pytest.raises(ConfigError, match="feature_noise.std"):
        FeatureNoise(std=0)


def test_feature_noise_on_the_whole_map_and_area_bounds():
    features = [torch.zeros(3, 4, 8, 8)]
    noise = FeatureNoise(probability=1.0, std=1.0, min_area=1.0, max_area=1.0, seed=0)
    noisy, masks = noise(features)
    assert bool((masks == 1).all()) and bool((noisy[0] != 0).all())  # SimpleNet: every patch
    with pytest.raises(ConfigError, match="max <= 1"):
        FeatureNoise(min_area=0.5, max_area=1.5)
    with pytest.raises(ConfigError, match="max < 1"):  # image-space regions stay below the image
        SyntheticAnomalies(min_area=0.5, max_area=1.0)


def test_pixel_statistics_z_scores_per_position_and_resize_on_load():
    torch.manual_seed(0)
    maps = torch.rand(50, 1, 8, 6) * torch.linspace(1, 3, 6) + torch.arange(8.0).view(8, 1)
    stats = PixelStatistics(eps=0.1)
    assert torch.equal(stats(maps[:2]), maps[:2])  # not fitted: unchanged
    stats.reset()
    for part in maps.split(16):
        stats.update(part)
    stats.finish()
    assert stats.size.tolist() == [8, 6]
    assert torch.allclose(stats.mean.view(8, 6), maps.mean(0)[0], atol=1e-5)
    assert torch.allclose(stats.std.view(8, 6), maps.std(0)[0], atol=1e-5)
    z = stats(maps)
    assert z.mean(0).abs().max() < 1e-4  # every position centred on its own mean
    fresh = PixelStatistics()
    fresh.load_state_dict(stats.state_dict())  # buffers take the checkpoint's map size
    assert torch.equal(fresh(maps), z)
    with pytest.raises(ConfigError, match="data.image_size"):
        stats(torch.rand(1, 1, 4, 4))
    with pytest.raises(ConfigError, match="at least 2"):
        stats.finish()
