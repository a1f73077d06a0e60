"""Shared building blocks (pure torch): backbone, embedding, samplers, kNN, anomaly maps."""

from defectlab.components.anomaly_map import AnomalyMapGenerator, MapScore
from defectlab.components.backbone import (
    BackboneEnsemble,
    FeatureExtractor,
    frozen_weight_keys,
    load_backbone_state_dict,
)
from defectlab.components.bank_buffer import EmbeddingBuffer
from defectlab.components.calibration import Calibration
from defectlab.components.embedding import Embedder, NativeEmbedder, PatchEmbedder
from defectlab.components.feature_anomaly import FeatureNoise
from defectlab.components.knn import NearestNeighbors, resize_bank_for_load
from defectlab.components.pixel_statistics import PixelStatistics
from defectlab.components.sampler import (
    CoresetSampler,
    IdentitySampler,
    RandomSampler,
    Sampler,
    num_samples,
)
from defectlab.components.synthetic_anomaly import SyntheticAnomalies

__all__ = [
    "AnomalyMapGenerator",
    "BackboneEnsemble",
    "Calibration",
    "CoresetSampler",
    "Embedder",
    "EmbeddingBuffer",
    "FeatureExtractor",
    "FeatureNoise",
    "IdentitySampler",
    "MapScore",
    "NativeEmbedder",
    "NearestNeighbors",
    "PatchEmbedder",
    "PixelStatistics",
    "RandomSampler",
    "Sampler",
    "SyntheticAnomalies",
    "frozen_weight_keys",
    "load_backbone_state_dict",
    "num_samples",
    "resize_bank_for_load",
]
