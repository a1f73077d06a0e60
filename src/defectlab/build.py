"""Build a model and its Lightning system from a composed config (training and loading alike).

The ``model`` node builds the pure torch model, the ``system`` node (chosen by the model's
defaults: conf/system/) the Lightning system around it; each instantiates on its own.
"""

from __future__ import annotations

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
    """The ``model`` node without ``fit`` (present only in configs from before the system group)."""
    if cfg.model.get("fit") is None:
        return cfg.model
    node = OmegaConf.to_container(cfg.model, resolve=True)
    node.pop("fit")
    return OmegaConf.create(node)


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
