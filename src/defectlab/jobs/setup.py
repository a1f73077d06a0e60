"""One job's objects from a composed config: data, system, trainer, image writer (fails early)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from defectlab.build import build, build_run_system, check_input_size
from defectlab.callbacks import AnomalyImageWriter
from defectlab.errors import ConfigError
from defectlab.models import PatchCore, PatchCoreEnsemble, TwoScalePatchCore
from defectlab.models.protocols import MemoryBankModel, TrainedModel
from defectlab.systems import AnomalySystem, TrainedSystem

# Intended, not problems: frozen backbones stay in eval mode, memory banks have no optimiser.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned `None`.*")


@dataclass
class Job:
    """Everything one run needs, built from a composed config."""

    cfg: DictConfig
    out_dir: Path
    datamodule: L.LightningDataModule
    system: AnomalySystem
    trainer: L.Trainer
    image_writer: AnomalyImageWriter


def _build_all(group: DictConfig | None) -> list:
    return [build(node) for node in (group or {}).values() if node is not None]


def check_threshold_data(cfg: DictConfig) -> None:
    """ConfigError when the threshold strategy needs data the config does not give."""
    if cfg.threshold.strategy == "f1_val" and not cfg.data.get("val_dir"):
        raise ConfigError(
            "threshold=f1_val needs a labeled validation folder: data.val_dir=<folder with good/ "
            "and <defect_type>/ sub-folders>"
        )


def check_model_data(cfg: DictConfig, system: AnomalySystem) -> None:
    """ConfigError when the data settings do not fit the model (cross-group checks)."""
    model = system.model
    labeled = cfg.data.get("labeled_anomalies", 0) or cfg.data.get("labelled_anomalies") or 0
    if labeled and not (isinstance(model, TrainedModel) and model.supervised):
        raise ConfigError(
            f"data.labeled_anomalies={labeled}: only supervised models "
            f"(model=unet) may train on defective images; {cfg.model_name} learns from good "
            "images only. Set data.labeled_anomalies=0."
        )
    if isinstance(model, PatchCoreEnsemble) and not cfg.data.val_ratio > 0:
        raise ConfigError(
            "backbone=ensemble normalises its members on held-out good images: data.val_ratio "
            "must be > 0"
        )
    banks = model.bank_models() if isinstance(model, MemoryBankModel) else []
    if any(
        isinstance(m, (PatchCore, TwoScalePatchCore)) and m.pixel_statistics is not None
        for m in (model, *banks)
    ) and not (cfg.data.val_ratio > 0):
        raise ConfigError(
            "model.pixel_statistics are fitted on held-out good images: data.val_ratio must be > 0"
        )
    if isinstance(system, TrainedSystem) and not cfg.data.val_ratio > 0:
        raise ConfigError(
            f"model={cfg.model_name} stops early on held-out good images: data.val_ratio must "
            "be > 0"
        )


def build_job(cfg: DictConfig, out_dir: Path, system: AnomalySystem | None = None) -> Job:
    """Instantiate data, model, system, trainer and the image writer (fails on bad config).

    ``system``: an already built one (a loaded model file) instead of a new one from ``cfg``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    check_threshold_data(cfg)
    if system is None:
        system = build_run_system(cfg)
    else:
        check_input_size(system.model, cfg.data)
    check_model_data(cfg, system)
    datamodule = build(cfg.data, shuffle_train=isinstance(system, TrainedSystem))
    image_writer = AnomalyImageWriter(
        out_dir / "images", cfg.data.category, cfg.eval.images.max_per_type
    )
    trainer = build(
        cfg.trainer,
        logger=_build_all(cfg.get("logger")) or False,
        callbacks=[*_build_all(cfg.get("callbacks")), image_writer],
    )
    return Job(cfg, out_dir, datamodule, system, trainer, image_writer)
