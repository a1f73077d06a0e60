"""Pure torch anomaly-detection algorithms; every one returns an :class:`AnomalyOutput`."""

from defectlab.models.autoencoder import ConvAutoencoder
from defectlab.models.ensemble import PatchCoreEnsemble, build_patchcore
from defectlab.models.feature_knn import FeatureKNN
from defectlab.models.output import AnomalyOutput
from defectlab.models.patchcore import PatchCore
from defectlab.models.protocols import DerivedBuffers, ResizableBuffers
from defectlab.models.two_scale import TwoScalePatchCore
from defectlab.models.unet import UNet

__all__ = [
    "AnomalyOutput",
    "ConvAutoencoder",
    "DerivedBuffers",
    "FeatureKNN",
    "PatchCore",
    "PatchCoreEnsemble",
    "ResizableBuffers",
    "TwoScalePatchCore",
    "UNet",
    "build_patchcore",
]
