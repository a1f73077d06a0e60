"""U-Net defect segmenter (Ronneberger et al., MICCAI 2015), trained on pixel masks.

Two encoders: a from-scratch convolutional one, or a pretrained timm backbone
(:class:`FeatureExtractor`, ImageNet weights), frozen or fine-tuned. Two decoders on the
pretrained encoder (``decoder``):

- ``unet``: the stages feed a light convolutional decoder through skip connections;
- ``patch``: every stage, average-pooled over 3 x 3 and resized to the finest one, is concatenated
  into one patch vector (PatchCore's :class:`NativeEmbedder`), adapted by a 1 x 1 layer and
  classified patch by patch (the segmentation head of SimpleNet, Liu et al. CVPR 2023, and
  SuperSimpleNet, Rolih et al. ICPR 2024), trained with a truncated L1 loss on clean and noisy
  copies of each feature map.

Optionally, anomalies are also synthesised in feature space (:class:`FeatureNoise`); the patch
decoder learns from them alone in ``experiment=unet_fast``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.components import (
    AnomalyMapGenerator,
    FeatureExtractor,
    FeatureNoise,
    MapScore,
    NativeEmbedder,
    PixelStatistics,
)
from defectlab.components.embedding import check_patch_size
from defectlab.components.shapes import check_divisible
from defectlab.errors import ConfigError
from defectlab.models.output import AnomalyOutput

DECODERS = ("unet", "patch")
# Margin of the truncated L1 loss of the patch decoder (SimpleNet's th = 0.5): a patch's logit
# stops being pushed once it is 0.5 on the right side of 0.
MARGIN = 0.5


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections predicting a per-pixel defect probability.

    Supervised: ``loss(images, masks)`` needs masks (synthetic anomalies on good images, optionally
    a few real labeled defects). Loss = class-balanced BCE + soft Dice (``decoder=patch``:
    SimpleNet's truncated L1 on patches, :func:`truncated_l1`). The anomaly map is the
    Gaussian-smoothed probability; the image score is its maximum (or ``topk_mean``).

    Args:
        depth: down-sampling stages of the from-scratch encoder; image sides must be divisible by
            ``2**depth``. Unused with ``extractor``.
        channels: channels of the first from-scratch stage, doubled at every further stage.
        extractor: pretrained encoder; its configured layers are the skip levels. None = train
            the from-scratch encoder.
        finetune: train the extractor's weights too (its BatchNorm statistics stay frozen);
            False = frozen, its features are computed without gradients.
        decoder_channels: width of every decoder stage on top of an extractor (``unet``), or of
            the patch head's hidden layer (``patch``).
        decoder: ``unet`` (convolutional decoder with skip connections) or ``patch`` (per-patch
            head on the concatenated, 3 x 3 pooled stages; needs ``extractor``).
        patch_size: neighbourhood of the ``patch`` decoder's average pooling.
        feature_noise: anomalies synthesised on the (standardised) extractor features during
            training, beside the image-space ones; None = off.
        dice_weight: weight of the Dice term beside the BCE term (``unet``).
        max_pos_weight: cap of the BCE weight of defect pixels (``#good / #defect`` per batch):
            defects cover a few percent of the pixels, unweighted BCE would learn "never".
        score: ``max`` or ``topk_mean`` reduction of the map into the image score.
        topk: pixels averaged by ``topk_mean``.
        blur_sigma: Gaussian sigma of the probability map (pixels); 0 disables it.
        flip_average: score the mean of the probability maps of the image and its horizontal,
            vertical and double flips (each flipped back): four forwards per image.
        pixel_statistics: per-position z-scores of the probability map against the maps of the
            good training images (aligned products), fitted by the training system for the
            kept weights (:meth:`fit_statistics`); None = the probability map as it is.
    """

    supervised = True

    def __init__(
        self,
        depth: int = 4,
        channels: int = 32,
        extractor: FeatureExtractor | None = None,
        finetune: bool = False,
        decoder_channels: int = 64,
        decoder: str = "unet",
        patch_size: int = 3,
        feature_noise: FeatureNoise | None = None,
        dice_weight: float = 1.0,
        max_pos_weight: float = 50.0,
        score: str = "max",
        topk: int = 100,
        blur_sigma: float = 2.0,
        flip_average: bool = False,
        pixel_statistics: PixelStatistics | None = None,
    ) -> None:
        super().__init__()
        if depth < 1 or channels < 1 or decoder_channels < 1:
            raise ConfigError(
                f"model.depth={depth}, model.channels={channels} and "
                f"model.decoder_channels={decoder_channels} must be >= 1"
            )
        if max_pos_weight < 1:
            raise ConfigError(f"model.max_pos_weight must be >= 1, got {max_pos_weight}")
        if extractor is not None and not isinstance(extractor, FeatureExtractor):
            raise ConfigError(
                f"model=unet needs one backbone as its encoder, got {type(extractor).__name__}: "
                "choose backbone=efficientnet_lite0|efficientnet_lite1|mobilenet_v2|... "
                "(not backbone=ensemble), or model.extractor=null to train from scratch"
            )
        if decoder not in DECODERS:
            raise ConfigError(f"model.decoder={decoder}: choose one of {DECODERS}")
        if decoder == "patch":
            check_patch_size(patch_size, "model.patch_size")
            if extractor is None:
                raise ConfigError(
                    "model.decoder=patch classifies pretrained patch features: set "
                    "model.extractor (a backbone), or model.decoder=unet to train from scratch"
                )
        if feature_noise is not None and extractor is None:
            raise ConfigError(
                "model.feature_noise perturbs pretrained features: set model.extractor "
                "(a backbone) or model.feature_noise=null"
            )
        self.depth = depth
        self.dice_weight = dice_weight
        self.max_pos_weight = max_pos_weight
        self.finetune = finetune
        self.feature_noise = feature_noise
        self.decoder = decoder
        self.pretrained_encoder = extractor is not None
        if extractor is None:
            widths = [channels * 2**i for i in range(depth + 1)]
            self.down = nn.ModuleList(
                _double_conv(cin, cout) for cin, cout in zip([3, *widths[:-1]], widths, strict=True)
            )
            skips, outs = widths, widths
        else:
            self.extractor = extractor
            if finetune:
                extractor.fine_tune()  # its weights then travel in the model file
            skips = list(extractor.channels)
            if decoder == "patch":
                self.embedder = NativeEmbedder(skips, patch_size=patch_size)
                skips = [self.embedder.out_dim]
            # Per-channel standardisation (running statistics): the noise std of feature_noise is
            # in these units, and the decoder sees inputs of one scale whatever the backbone.
            self.standardize = nn.ModuleList(nn.BatchNorm2d(c, affine=False) for c in skips)
            if decoder == "unet":
                outs = [decoder_channels] * len(skips)
                self.bottom = nn.Conv2d(skips[-1], outs[-1], 1)
        if decoder == "patch":
            dim = skips[0]
            # SimpleNet's feature adaptor, starting as the identity: noise is added after it.
            self.adaptor = nn.Conv2d(dim, dim, 1)
            with torch.no_grad():
                self.adaptor.weight.copy_(torch.eye(dim).view(dim, dim, 1, 1))
                self.adaptor.bias.zero_()
            self.head = nn.Sequential(
                nn.Conv2d(dim, decoder_channels, 1),
                nn.BatchNorm2d(decoder_channels),
                nn.LeakyReLU(0.2),
                nn.Conv2d(decoder_channels, 1, 1),
            )
        else:
            self.up = nn.ModuleList(
                _double_conv(outs[i + 1] + skips[i], outs[i])
                for i in reversed(range(len(skips) - 1))
            )
            self.head = nn.Conv2d(outs[0], 1, 1)
        self.anomaly_map = AnomalyMapGenerator(blur_sigma)
        self.map_score = MapScore(score, topk)
        self.flip_average = flip_average
        self.pixel_statistics = pixel_statistics

    @property
    def synthesizes_defects(self) -> bool:
        """models.protocols.TrainedModel: feature noise draws defects inside :meth:`loss`."""
        return self.feature_noise is not None

    @torch.no_grad()
    def fit_statistics(self, good_images: Iterable[torch.Tensor]) -> None:
        """models.protocols.TrainedModel: refit ``pixel_statistics`` (if any) on good images."""
        if self.pixel_statistics is None:
            return
        self.pixel_statistics.fit(self.probability(images) for images in good_images)

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this (checked from the config before any work)."""
        return self.extractor.input_multiple if self.pretrained_encoder else 2**self.depth

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Skip features, finest first, of images ``(B, 3, H, W)`` in [0, 1].

        With the ``patch`` decoder: one map, the adapted patch vectors.
        """
        if not self.pretrained_encoder:
            check_divisible(images, self.depth)
            skips, x = [], images
            for i, block in enumerate(self.down):
                x = block(x if i == 0 else F.max_pool2d(x, 2))
                skips.append(x)
            return skips
        with torch.set_grad_enabled(self.finetune and torch.is_grad_enabled()):
            features = self.extractor(images)
        if self.decoder == "patch":
            return [self.adaptor(self.standardize[0](self.embedder(features)))]
        return [norm(f) for norm, f in zip(self.standardize, features, strict=True)]

    def decode(self, skips: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Defect logits ``(B, 1, *size)`` from skip features, finest first."""
        if self.decoder == "patch":
            return F.interpolate(
                self.head(skips[0]), size=size, mode="bilinear", align_corners=False
            )
        x = skips[-1] if not self.pretrained_encoder else self.bottom(skips[-1])
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        logits = self.head(x)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Defect logits ``(B, 1, H, W)`` of images ``(B, 3, H, W)`` in [0, 1]."""
        return self.decode(self.encode(images), tuple(images.shape[-2:]))

    def loss(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Class-balanced BCE + soft Dice of images ``(B, 3, H, W)`` against masks ``(B, 1, H, W)``
        (``decoder=patch``: :meth:`_patch_loss`).

        With ``feature_noise``, noisy feature regions count as defects too: drawn from its own
        generator while training, from ``generator`` when one is given (a fixed held-out draw).
        """
        size = tuple(images.shape[-2:])
        skips = self.encode(images)
        target = masks.float()
        if self.decoder == "patch":
            return self._patch_loss(skips[0], target, generator)
        if self.feature_noise is not None and (self.training or generator is not None):
            # Only images without a defect get noisy features: one kind of defect per image, and
            # the share of clean images stays (1 - p_image) * (1 - p_feature).
            clean = target.flatten(1).amax(1) == 0
            noisy_skips, noisy = self.feature_noise(skips, generator)
            keep = clean.view(-1, 1, 1, 1)
            skips = [torch.where(keep, n, s) for n, s in zip(noisy_skips, skips, strict=True)]
            noisy = F.interpolate(noisy, size=size, mode="nearest") * keep
            target = torch.maximum(target, noisy)
        return self.segmentation_loss(self.decode(skips, size), target)

    def _patch_loss(
        self, x: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Truncated L1 of the patch head on the clean map and, with feature noise, a noisy copy.

        A patch is a defect where any of its pixels is (image-space defects, real or synthetic)
        or where the copy got noise. As SimpleNet, every image is seen clean and noisy in the same
        step: the head compares the two, rather than a share of the images.
        """
        target = F.adaptive_max_pool2d(masks, x.shape[-2:])
        feats, targets = [x], [target]
        if self.feature_noise is not None and (self.training or generator is not None):
            noisy, region = self.feature_noise([x], generator)
            feats.append(noisy[0])
            targets.append(torch.maximum(target, region))
        return truncated_l1(self.head(torch.cat(feats)), torch.cat(targets))

    def segmentation_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class-balanced BCE + soft Dice of logits against a mask, both ``(B, 1, H, W)``."""
        positives = target.sum()
        pos_weight = ((target.numel() - positives) / positives.clamp(min=1)).clamp(
            1.0, self.max_pos_weight
        )
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
        prob = torch.sigmoid(logits)
        # Over the whole batch: images without a defect still penalise false positives.
        dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        return bce + self.dice_weight * dice

    @torch.no_grad()
    def probability(self, images: torch.Tensor) -> torch.Tensor:
        """Defect probability ``(B, 1, H, W)``; with ``flip_average`` the mean over four flips."""
        prob = torch.sigmoid(self(images))
        if not self.flip_average:
            return prob
        # The decoder's errors on good texture differ between flipped views, a defect stays where
        # it is: ELPV poly 0.7667 -> 0.7992 with the conv decoder preset (docs/methods/unet.md).
        for dims in ((-1,), (-2,), (-2, -1)):
            prob = prob + torch.sigmoid(self(images.flip(dims))).flip(dims)
        return prob / 4

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images ``(B, 3, H, W)``: smoothed defect probability and its maximum."""
        prob = self.probability(images)
        if self.pixel_statistics is not None:
            prob = self.pixel_statistics(prob)  # unchanged until fitted, as the CAE's
        amap = self.anomaly_map(prob, tuple(images.shape[-2:]))
        return AnomalyOutput(score=self.map_score(amap), anomaly_map=amap)


def truncated_l1(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SimpleNet's loss: mean ``max(0, MARGIN + logit)`` over normal cells plus the mean of
    ``max(0, MARGIN - logit)`` over defect cells (each class weighs the same; 0 if absent)."""
    normal = 1 - target
    return (F.relu(MARGIN + logits) * normal).sum() / normal.sum().clamp(min=1) + (
        F.relu(MARGIN - logits) * target
    ).sum() / target.sum().clamp(min=1)
