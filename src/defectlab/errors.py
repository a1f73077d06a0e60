"""The project's own error types: every message names the file or config key and what to do."""


class DefectlabError(Exception):
    """Base class for every error defectlab raises on purpose."""


class DataError(DefectlabError):
    """A data file or folder is missing, unreadable or inconsistent."""


class ConfigError(DefectlabError, ValueError):
    """A config value is invalid; the message names the key."""


class BackboneWeightsError(DefectlabError):
    """Backbone weights could not be found or do not fit the architecture."""


class ExportError(DefectlabError):
    """An exported model does not reproduce the trained one; nothing was written."""


class ModelFileError(DefectlabError):
    """A trained-model file is refused: pickle-based, unknown format, or tensors that do not fit."""
