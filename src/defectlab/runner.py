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
from omegaconf import DictConfig, OmegaConf

from defectlab.build import build, build_run_system, check_input_size
from defectlab.callbacks import AnomalyImageWriter
from defectlab.components import FeatureExtractor
from defectlab.errors import ConfigError, DefectlabError
from defectlab.experiment_log import finish, log_run
from defectlab.model_file import MODEL_FILE, load_model, locate_model, save_model
from defectlab.models import PatchCore, PatchCoreEnsemble
from defectlab.provenance import provenance
from defectlab.results import (
    compare_metrics,
    format_summary,
    peak_rss_mb,
    read_json,
    write_json_atomic,
)
from defectlab.systems import AnomalySystem, TrainedSystem
from defectlab.visualize import save_run_plots

# Intended, not problems: frozen backbones stay in eval mode, memory banks have no optimiser.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned `None`.*")

# Keys of the composed config whose values come from Hydra's runtime and are frozen on save.
_RUNTIME_KEYS = ("model_name", "backbone_name", "embedding_name", "data_name")


def _uses(model: torch.nn.Module, kind: type) -> bool:
    """True if ``model`` is or contains a ``kind`` module (ensembles hold one per member)."""
    return any(isinstance(module, kind) for module in model.modules())


def _build_all(group: DictConfig | None) -> list:
    return [build(node) for node in (group or {}).values() if node is not None]


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


def build_job(cfg: DictConfig, out_dir: Path, system: AnomalySystem | None = None) -> Job:
    """Instantiate data, model, system, trainer and the image writer (fails on bad config).

    ``system``: an already built one (a loaded model file) instead of a new one from ``cfg``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.threshold.strategy == "f1_val" and not cfg.data.get("val_dir"):
        raise ConfigError(
            "threshold=f1_val needs a labelled validation folder: data.val_dir=<folder with good/ "
            "and <defect_type>/ sub-folders>"
        )
    if system is None:
        system = build_run_system(cfg)
    else:
        check_input_size(system.model, cfg.data)
    model = system.model
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


def test_and_report(job: Job, model_file: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Test ``job.system`` (loaded from ``model_file``), then write results, predictions, plots.

    ``extra`` adds top-level entries; its ``timing``, ``memory`` and ``counts`` are merged into
    those sections.
    """
    extra = dict(extra)
    start = time.perf_counter()
    # verbose=False: Lightning's table would list every per-type key; format_summary prints ours.
    job.trainer.test(job.system, datamodule=job.datamodule, verbose=False)
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
            # Training-embedding buffer of memory-bank models (size, dtype, chunking): from fitting.
            **extra.pop("memory", {}),
        },
        "counts": {
            "test": n_test,
            "skipped_files": len(getattr(job.datamodule, "skipped", [])),
            "test_defective": sum(s.label for s in job.datamodule.test_set.samples),
            "labeled_anomalies": dict(job.datamodule.labeled_counts),
            **extra.pop("counts", {}),
        },
        "model_file": str(model_file.resolve()),
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


def restore_best_epoch(system: TrainedSystem, best: Path) -> int:
    """Load the best epoch's weights and calibration from Lightning's checkpoint; its epoch (1-).

    The checkpoint was written by this training run a moment ago; torch's weights-only reader
    still refuses anything but tensors and plain containers.
    """
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    system.on_load_checkpoint(checkpoint)
    system.load_state_dict(checkpoint["state_dict"])
    return int(checkpoint["epoch"]) + 1


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Fit ``cfg.model`` on ``cfg.data``, save the model file, test it as loaded, write the run."""
    job = build_job(cfg, Path(cfg.paths.output_dir))
    job.system.run_config = config_snapshot(cfg)  # embedded in Lightning's training checkpoints

    start = time.perf_counter()
    job.trainer.fit(job.system, datamodule=job.datamodule)
    fit_s = time.perf_counter() - start

    fitted, path = job.system, job.out_dir / MODEL_FILE
    extra: dict[str, Any] = {}
    file_extra: dict[str, Any] = {}
    if isinstance(fitted, TrainedSystem):
        best = job.trainer.checkpoint_callback.best_model_path
        if not best:
            raise DefectlabError("training ended before a validation epoch: no checkpoint")
        # The best epoch is the model that is saved and tested; best.ckpt stays for resuming.
        file_extra["training"] = {"epoch": restore_best_epoch(fitted, Path(best))}
        extra["training"] = fitted.training_summary()
    save_model(fitted, config_snapshot(cfg), path, extra=file_extra)
    extra |= {
        "validation": dict(fitted.validation_metrics),
        "memory": dict(getattr(fitted, "memory_stats", {})),
        "timing": {"fit_s": fit_s, "sample_s": getattr(fitted, "sample_s", None)},
    }
    # Test exactly what is deployed: the model file, through the loader every consumer uses.
    del fitted
    job.system = load_model(path).system
    results = test_and_report(
        job,
        path,
        {
            **extra,
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
    if not path.is_file() or not (out_dir / MODEL_FILE).is_file():
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


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Load a trained model file, re-test it and write a new results folder.

    ``cfg.data.*`` values that are not null override the run's data config, to score another
    root or category with the same model. Nothing in the training run folder is modified.
    """
    path, reference = locate_model(cfg.run_dir, cfg.model_path)
    loaded = load_model(path)
    run_cfg = loaded.config
    out_dir = Path(cfg.paths.output_dir)
    run_cfg.paths.output_dir = str(out_dir)
    overrides = {k: v for k, v in cfg.data.items() if v is not None}
    if "root" in overrides:
        run_cfg.data.prepare = None  # another root is the user's own MVTec-layout folder
    for key, value in overrides.items():
        run_cfg.data[key] = value
    same_data = not ({"root", "category"} & overrides.keys())

    job = build_job(run_cfg, out_dir, system=loaded.system)
    results = test_and_report(job, path, {"evaluated_from": str(path.resolve())})
    if reference is not None and same_data:
        diff = compare_metrics(read_json(reference), results)
        results["reproduces"] = {"results": str(reference.resolve()), "max_abs_diff": diff}
        write_json_atomic(out_dir / "results.json", results)
        print(f"matches {reference}: max |difference| over all metrics = {diff:.3g}")
    finish(job.trainer.loggers)
    print(format_summary(results))
    print(f"results: {out_dir / 'results.json'}")
    return results
