"""Build a model and its Lightning system from a composed config (training and loading alike)."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from defectlab.errors import ConfigError, DefectlabError
from defectlab.systems import AnomalySystem, build_system


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


def build_model(cfg: DictConfig) -> tuple[Any, dict[str, Any] | None]:
    """The pure torch model, and the built ``model.fit`` section of trained models.

    ``model.fit`` (optimizer, patience, synthetic anomalies) configures the Lightning system, not
    the model, so it is split off before instantiation; ``max_epochs`` goes to the trainer.
    """
    node = OmegaConf.to_container(cfg.model, resolve=True)
    fit = node.pop("fit", None)
    model = build(OmegaConf.create(node))
    if fit is None:
        return model, None
    fit = OmegaConf.create(fit)
    training = {
        "optimizer": build(fit.optimizer),
        "patience": fit.patience,
        "min_delta": fit.min_delta,
    }
    if fit.get("anomalies") is not None:
        training["anomalies"] = build(fit.anomalies)
    return model, training


def check_input_size(model: Any, data: DictConfig) -> None:
    """ConfigError unless the network input side is a multiple of what the model needs."""
    multiple = getattr(model, "input_multiple", 1)
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
    model, training = build_model(cfg)
    check_input_size(model, cfg.data)
    return build_system(
        model,
        training,
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
