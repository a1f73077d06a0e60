"""defectlab: unsupervised visual defect detection experiments (PatchCore and friends)."""

from defectlab.errors import (
    BackboneWeightsError,
    ConfigError,
    DataError,
    DefectlabError,
    ModelFileError,
)

__all__ = [
    "BackboneWeightsError",
    "ConfigError",
    "DataError",
    "DefectlabError",
    "ModelFileError",
]
__version__ = "0.1.0"
