"""Pure torch anomaly-detection algorithms; every one returns an :class:`AnomalyOutput`."""

from defectlab.models.feature_knn import FeatureKNN
from defectlab.models.output import AnomalyOutput
from defectlab.models.patchcore import PatchCore

__all__ = ["AnomalyOutput", "FeatureKNN", "PatchCore"]
