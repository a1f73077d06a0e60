"""Build a model and its Lightning system from a composed config (training and loading alike).

The ``model`` node builds the pure torch model, the ``system`` node (chosen by the model's
defaults: conf/system/) the Lightning system around it; each instantiates on its own.
"""

from __future__ import annotations

import warnings
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from defectlab.errors import ConfigError, DefectlabError
from defectlab.models.protocols import AnomalyModel
from defectlab.systems import AnomalySystem

MEMORY_BANK = "defectlab.systems.MemoryBankSystem"
TRAINED = "defectlab.systems.TrainedSystem"
TRAINED_KEYS = (
    "max_epochs",
    "min_steps",
    "max_steps",
    "patience",
    "min_delta",
    "optimizer",
    "anomalies",
)
# model.knn settings of the removed hnsw backend, still in model files saved before its removal.
REMOVED_KNN_KEYS = ("hnsw_m", "ef_search")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets defectlab's own errors through unwrapped.

    Hydra wraps constructor errors in InstantiationException, whose repr buries our message
    (which already names the config key and what to do).
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, DefectlabError):
            raise err.__cause__ from None
        raise


def system_node(cfg: DictConfig) -> DictConfig:
    """The ``system`` node of a run config (a partial: the system class and its training settings).

    Configs written before the ``system`` group (model files of earlier runs) kept the training
    settings of CAE and U-Net under ``model.fit``; they are read into the same node.
    """
    if cfg.get("system") is not None:
        return cfg.system
    fit = cfg.model.get("fit")
    if fit is None:
        return OmegaConf.create({"_target_": MEMORY_BANK, "_partial_": True})
    fit = OmegaConf.to_container(fit, resolve=True)  # its ${seed} refers to the whole config
    return OmegaConf.create(
        {"_target_": TRAINED, "_partial_": True, **{k: fit[k] for k in fit if k in TRAINED_KEYS}}
    )


def model_node(cfg: DictConfig) -> DictConfig:
    """The ``model`` node as today's classes take it, from a config of any earlier run.

    Drops ``fit`` (configs from before the system group) and reads the removed ``hnsw`` search
    backend's settings out of ``model.knn`` (:func:`_without_hnsw`).
    """
    knn = cfg.model.get("knn")
    legacy_knn = isinstance(knn, DictConfig) and any(key in knn for key in REMOVED_KNN_KEYS)
    if cfg.model.get("fit") is None and not legacy_knn:
        return cfg.model
    node = OmegaConf.to_container(cfg.model, resolve=True)
    node.pop("fit", None)
    if legacy_knn:
        node["knn"] = _without_hnsw(node["knn"])
    return OmegaConf.create(node)


def _without_hnsw(knn: dict[str, Any]) -> dict[str, Any]:
    """``model.knn`` of a run saved while the ``hnsw`` backend existed, for today's search.

    Every model file of those runs stores ``hnsw_m`` and ``ef_search``, used or not: they are
    dropped. A run that searched with ``hnsw`` is searched exactly: same bank, and each patch
    distance can only be equal or lower than the graph search's (it could miss the nearest row),
    so scores may differ slightly from the run's results.json; a warning says so.
    """
    knn = {key: value for key, value in knn.items() if key not in REMOVED_KNN_KEYS}
    if knn.get("backend") == "hnsw":
        warnings.warn(
            "model.knn.backend=hnsw was removed (slower than exact search: "
            "docs/benchmarks/search.md); this model's bank is searched exactly, so its scores "
            "can be slightly lower than the run's own results.json. Retrain with "
            "model.knn.backend=exact or ivf to silence this.",
            UserWarning,
            stacklevel=3,
        )
        knn["backend"] = "exact"
    return knn


def build_model(cfg: DictConfig) -> Any:
    """The pure torch model of a run config."""
    return build(model_node(cfg))


def check_input_size(model: AnomalyModel, data: DictConfig) -> None:
    """ConfigError unless the network input side is a multiple of what the model needs."""
    multiple = model.input_multiple
    key = "data.crop_size" if data.get("crop_size") else "data.image_size"
    size = data.get("crop_size") or data.image_size
    if size % multiple:
        lower, upper = size // multiple * multiple, (size // multiple + 1) * multiple
        raise ConfigError(
            f"{key}={size} is not a multiple of {multiple}, which {type(model).__name__} needs "
            f"(its deepest layer downsamples by {multiple}): use {key}="
            + (f"{lower} or {upper}" if lower else f"{upper}")
        )


def threshold_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved ``threshold`` section (ConfigError when a mandatory value is missing)."""
    try:
        return OmegaConf.to_container(cfg.threshold, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{err.full_key} must be set, e.g. threshold=fixed threshold.value=12.5"
        ) from None


def build_run_system(cfg: DictConfig) -> AnomalySystem:
    """Model and system of a run config: threshold, normalisation and evaluation settings."""
    threshold = threshold_config(cfg)
    model = build_model(cfg)
    check_input_size(model, cfg.data)
    make_system = build(system_node(cfg))  # the system group's partial
    return make_system(
        model,
        threshold=threshold,
        normalization=cfg.eval.normalization,
        evaluation={
            "max_fpr": cfg.eval.max_fpr,
            "bootstrap": OmegaConf.to_container(cfg.eval.bootstrap, resolve=True),
            "validation_repeats": cfg.eval.get("validation_repeats", 1),
        },
        validation_anomalies=(
            build(cfg.eval.validation_anomalies)
            if cfg.eval.get("validation_anomalies") is not None
            else None
        ),
    )
