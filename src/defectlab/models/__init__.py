"""Pure torch anomaly-detection algorithms; every one returns an :class:`AnomalyOutput`."""

from defectlab.models.output import AnomalyOutput
from defectlab.models.patchcore import PatchCore

__all__ = ["AnomalyOutput", "PatchCore"]
