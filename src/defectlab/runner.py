"""The jobs behind ``train.py`` and ``evaluate.py``: build, fit, calibrate, test, report."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from defectlab.callbacks import AnomalyImageWriter
from defectlab.components import FeatureExtractor
from defectlab.errors import ConfigError, DefectlabError
from defectlab.experiment_log import finish, log_run
from defectlab.models import PatchCore, PatchCoreEnsemble
from defectlab.provenance import provenance
from defectlab.results import (
    atomic_target,
    compare_metrics,
    format_summary,
    peak_rss_mb,
    read_json,
    write_json_atomic,
)
from defectlab.systems import AnomalySystem, TrainedSystem, build_system
from defectlab.visualize import save_run_plots

# Intended, not problems: frozen backbones stay in eval mode, memory banks have no optimiser.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned `None`.*")
# Testing a trained model's checkpoint needs no early-stopping/checkpoint callback state.
warnings.filterwarnings("ignore", message=r".*callbacks used to create the checkpoint need.*")

CHECKPOINT = Path("checkpoints") / "model.ckpt"
# Keys of the composed config whose values come from Hydra's runtime and are frozen on save.
_RUNTIME_KEYS = ("model_name", "backbone_name", "embedding_name", "data_name")


def _uses(model: torch.nn.Module, kind: type) -> bool:
    """True if ``model`` is or contains a ``kind`` module (ensembles hold one per member)."""
    return any(isinstance(module, kind) for module in model.modules())


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


def _build_all(group: DictConfig | None) -> list:
    return [build(node) for node in (group or {}).values() if node is not None]


def save_checkpoint_atomic(trainer: L.Trainer, path: Path) -> None:
    """Save to a temporary name, then rename: an interrupted save never leaves a loadable stub."""
    with atomic_target(path) as tmp:
        trainer.save_checkpoint(tmp)


def config_snapshot(cfg: DictConfig) -> dict:
    """The run's config, portable: Hydra runtime values frozen, data_dir made absolute.

    ``paths.output_dir`` is cleared while the interpolations that use it (logger folders) stay,
    so evaluate.py points every output at its own folder and never writes into the training run.
    """
    snapshot = OmegaConf.to_container(cfg, resolve=False)
    snapshot.pop("hydra", None)
    for key in _RUNTIME_KEYS:
        snapshot[key] = cfg.get(key)
    snapshot["paths"]["data_dir"] = str(Path(cfg.paths.data_dir).resolve())
    snapshot["paths"]["output_dir"] = None
    return snapshot


@dataclass
class Job:
    """Everything one run needs, built from a composed config."""

    cfg: DictConfig
    out_dir: Path
    datamodule: L.LightningDataModule
    system: AnomalySystem
    trainer: L.Trainer
    image_writer: AnomalyImageWriter


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


def build_job(cfg: DictConfig, out_dir: Path) -> Job:
    """Instantiate data, model, system, trainer and the image writer (fails on bad config)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.threshold.strategy == "f1_val" and not cfg.data.get("val_dir"):
        raise ConfigError(
            "threshold=f1_val needs a labelled validation folder: data.val_dir=<folder with good/ "
            "and <defect_type>/ sub-folders>"
        )
    try:
        threshold = OmegaConf.to_container(cfg.threshold, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{err.full_key} must be set, e.g. threshold=fixed threshold.value=12.5"
        ) from None
    model, training = build_model(cfg)
    check_input_size(model, cfg.data)
    system = build_system(
        model,
        training,
        threshold=threshold,
        normalization=cfg.eval.normalization,
        evaluation={
            "max_fpr": cfg.eval.max_fpr,
            "bootstrap": OmegaConf.to_container(cfg.eval.bootstrap, resolve=True),
        },
        validation_anomalies=(
            build(cfg.eval.validation_anomalies)
            if cfg.eval.get("validation_anomalies") is not None
            else None
        ),
    )
    trained = isinstance(system, TrainedSystem)
    if cfg.data.get("labeled_anomalies", 0) and not getattr(model, "supervised", False):
        raise ConfigError(
            f"data.labeled_anomalies={cfg.data.labeled_anomalies}: only supervised models "
            f"(model=unet) may train on defective images; {cfg.model_name} learns from good "
            "images only. Set data.labeled_anomalies=0."
        )
    if isinstance(model, PatchCoreEnsemble) and not cfg.data.val_ratio > 0:
        raise ConfigError(
            "backbone=ensemble normalises its members on held-out good images: data.val_ratio "
            "must be > 0"
        )
    if trained and not cfg.data.val_ratio > 0:
        raise ConfigError(
            f"model={cfg.model_name} stops early on held-out good images: data.val_ratio must "
            "be > 0"
        )
    datamodule = build(cfg.data, shuffle_train=trained)
    image_writer = AnomalyImageWriter(
        out_dir / "images", cfg.data.category, cfg.eval.images.max_per_type
    )
    trainer = build(
        cfg.trainer,
        logger=_build_all(cfg.get("logger")) or False,
        callbacks=[*_build_all(cfg.get("callbacks")), image_writer],
    )
    return Job(cfg, out_dir, datamodule, system, trainer, image_writer)


def test_and_report(job: Job, ckpt: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Test the saved checkpoint, then write results.json, predictions.json, plots and images.

    ``extra`` adds top-level entries; its ``timing`` and ``counts`` are merged into those sections.
    """
    extra = dict(extra)
    start = time.perf_counter()
    # Test what was saved: the checkpoint alone must reproduce these numbers.
    # verbose=False: Lightning's table would list every per-type key; format_summary prints ours.
    job.trainer.test(job.system, datamodule=job.datamodule, ckpt_path=str(ckpt), verbose=False)
    test_s = time.perf_counter() - start
    cfg, system, tested = job.cfg, job.system, job.system.test_results
    category = cfg.data.category
    n_test = len(job.datamodule.test_set)
    bank = getattr(system.model, "memory_bank", None)
    results = {
        "status": "completed",
        "category": category,
        "data": cfg.data_name,
        "model": cfg.model_name,
        # CAE and U-Net learn their own features: the backbone config does not apply to them.
        "backbone": cfg.backbone_name if _uses(system.model, FeatureExtractor) else None,
        # Patch-feature layout (embedding= group) of PatchCore; earlier runs had the paper's.
        "embedding": cfg.get("embedding_name") if _uses(system.model, PatchCore) else None,
        "metrics": tested["metrics"],
        # Held-out validation metrics (never the test set): what hyper-parameter searches optimise.
        "validation": dict(system.validation_metrics),
        "confusion_matrix": tested["confusion_matrix"],
        "oracle": tested["oracle"],
        "localization": tested["localization"],
        "per_defect_type": {f"{category}/{k}": v for k, v in tested["per_defect_type"].items()},
        "threshold": tested["threshold"],
        "timing": {
            **extra.pop("timing", {}),
            "test_s": test_s,
            "test_images_per_s": n_test / test_s,
        },
        "memory": {
            "peak_rss_mb": peak_rss_mb(),
            "bank_mb": None if bank is None else bank.numel() * bank.element_size() / 2**20,
            "parameters": sum(p.numel() for p in system.model.parameters()),
            "bank_shape": None if bank is None else list(bank.shape),
            # Training-embedding buffer of memory-bank models (size, dtype, chunking).
            **getattr(system, "memory_stats", {}),
        },
        "counts": {
            "test": n_test,
            "skipped_files": len(getattr(job.datamodule, "skipped", [])),
            "test_defective": sum(s.label for s in job.datamodule.test_set.samples),
            "labeled_anomalies": dict(job.datamodule.labeled_counts),
            **extra.pop("counts", {}),
        },
        "checkpoint": str(ckpt.resolve()),
        "seed": cfg.seed,
        "provenance": provenance(cfg, system.model),
        # on_bad_file=skip: what was left out, and masks with no image (ignored either way).
        "data_issues": {
            "skipped_files": list(getattr(job.datamodule, "skipped", [])),
            "orphan_masks": [str(p) for p in getattr(job.datamodule.index, "orphan_masks", [])],
        },
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "images": {"folder": str(job.image_writer.folder), "written": job.image_writer.count},
        **extra,
    }
    plots = {}
    if cfg.eval.plots:
        plots = save_run_plots(system.test_outputs, tested, job.out_dir / "plots")
        results["plots"] = {k: str(v) for k, v in plots.items()}
    log_run(job.trainer.loggers, cfg, results, plots, job.image_writer.folder)
    write_json_atomic(job.out_dir / "results.json", results)
    write_json_atomic(job.out_dir / "predictions.json", tested["predictions"])
    return results


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Fit ``cfg.model`` on ``cfg.data``, test the checkpoint and write the run folder."""
    job = build_job(cfg, Path(cfg.paths.output_dir))
    job.system.run_config = config_snapshot(cfg)

    start = time.perf_counter()
    job.trainer.fit(job.system, datamodule=job.datamodule)
    fit_s = time.perf_counter() - start

    ckpt = job.out_dir / CHECKPOINT
    extra: dict[str, Any] = {}
    if isinstance(job.system, TrainedSystem):
        best = job.trainer.checkpoint_callback.best_model_path
        if not best:
            raise DefectlabError("training ended before a validation epoch: no checkpoint")
        Path(best).replace(ckpt)  # the best epoch (rename: atomic) is the model that is tested
        extra["training"] = job.system.training_summary()
    else:
        save_checkpoint_atomic(job.trainer, ckpt)
    results = test_and_report(
        job,
        ckpt,
        {
            **extra,
            "timing": {"fit_s": fit_s, "sample_s": getattr(job.system, "sample_s", None)},
            "counts": {
                "train": len(job.datamodule.fit_set),
                "holdout": len(job.datamodule.val_set),
            },
            "overrides": job_overrides(),
        },
    )
    finish(job.trainer.loggers)
    print(format_summary(results))
    print(f"results: {job.out_dir / 'results.json'}")
    return results


def job_overrides() -> list[str]:
    """This job's command-line overrides (``resume=...`` left out); [] outside Hydra."""
    try:
        task = HydraConfig.get().overrides.task
    except ValueError:  # HydraConfig not set: called from Python, not through @hydra.main
        return []
    return sorted(o for o in task if o.partition("=")[0].lstrip("+~") != "resume")


def finished_results(out_dir: Path) -> dict[str, Any] | None:
    """results.json of a job that completed earlier with this job's overrides, else None.

    A failed, interrupted (no results.json) or differently configured job is run again.
    """
    path = out_dir / "results.json"
    if not path.is_file() or not (out_dir / CHECKPOINT).is_file():
        return None
    try:
        results = read_json(path)
    except ValueError:  # unreadable: run again (writes are atomic, so only a foreign file)
        return None
    if results.get("status") != "completed" or results.get("overrides") != job_overrides():
        return None
    return results


def optimized_value(results: dict[str, Any], key: str) -> float | None:
    """The value of ``optimized_metric``: a test metric, or a ``val_*`` validation metric."""
    if key in results.get("validation", {}):
        return results["validation"][key]
    if key.startswith("val_"):
        raise ConfigError(
            f"optimized_metric={key} was not computed: validation metrics need "
            "eval.validation_anomalies (val_synthetic_auroc) or data.val_dir (val_image_auroc)"
        )
    return results["metrics"].get(key)


def checkpoint_config(checkpoint: dict, ckpt: Path) -> DictConfig:
    """The run config train.py embedded in a loaded checkpoint (ConfigError if there is none)."""
    snapshot = checkpoint.get("defectlab_config")
    if snapshot is None:
        raise ConfigError(f"{ckpt} holds no defectlab_config: it was not written by train.py")
    return OmegaConf.create(snapshot)


def locate_checkpoint(run_dir: str | None, ckpt_path: str | None) -> tuple[Path, Path | None]:
    if (run_dir is None) == (ckpt_path is None):
        raise ConfigError(
            "give exactly one of run_dir=<train run folder> or ckpt_path=<model.ckpt>"
        )
    if run_dir is not None:
        ckpt = Path(run_dir) / CHECKPOINT
        reference = Path(run_dir) / "results.json"
    else:
        ckpt = Path(ckpt_path)
        reference = ckpt.parent.parent / "results.json"
    if not ckpt.is_file():
        raise ConfigError(
            f"no checkpoint at {ckpt}: point run_dir= at a folder written by train.py"
        )
    return ckpt, reference if reference.is_file() else None


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild a trained model from its checkpoint, re-test it and write a new results folder.

    ``cfg.data.*`` values that are not null override the run's data config, to score another
    root or category with the same model. Nothing in the training run folder is modified.
    """
    ckpt, reference = locate_checkpoint(cfg.run_dir, cfg.ckpt_path)
    # mmap: only the small config entry is read here; trainer.test loads the tensors later.
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    run_cfg = checkpoint_config(checkpoint, ckpt)
    out_dir = Path(cfg.paths.output_dir)
    run_cfg.paths.output_dir = str(out_dir)
    overrides = {k: v for k, v in cfg.data.items() if v is not None}
    if "root" in overrides:
        run_cfg.data.prepare = None  # another root is the user's own MVTec-layout folder
    for key, value in overrides.items():
        run_cfg.data[key] = value
    same_data = not ({"root", "category"} & overrides.keys())

    job = build_job(run_cfg, out_dir)
    results = test_and_report(job, ckpt, {"evaluated_from": str(ckpt.resolve())})
    if reference is not None and same_data:
        diff = compare_metrics(read_json(reference), results)
        results["reproduces"] = {"results": str(reference.resolve()), "max_abs_diff": diff}
        write_json_atomic(out_dir / "results.json", results)
        print(f"matches {reference}: max |difference| over all metrics = {diff:.3g}")
    finish(job.trainer.loggers)
    print(format_summary(results))
    print(f"results: {out_dir / 'results.json'}")
    return results
