"""The job behind ``train.py``: build, fit, save the model file, test it as loaded, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from defectlab.errors import DefectlabError
from defectlab.experiment_log import finish
from defectlab.jobs.run_folder import RESULTS, config_snapshot, job_overrides
from defectlab.jobs.setup import build_job
from defectlab.jobs.testing import test_and_report
from defectlab.model_file import MODEL_FILE, load_model, save_model
from defectlab.results import format_summary
from defectlab.systems import TrainedSystem


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
    report = job.system.fit(job.trainer, job.datamodule)
    fit_s = time.perf_counter() - start

    fitted, path = job.system, job.out_dir / MODEL_FILE
    extra: dict[str, Any] = {}
    file_extra: dict[str, Any] = {}
    if report.training is not None:
        best = job.trainer.checkpoint_callback.best_model_path
        if not best:
            raise DefectlabError("training ended before a validation epoch: no checkpoint")
        # The best epoch is the model that is saved and tested; best.ckpt stays for resuming.
        file_extra["training"] = {"epoch": restore_best_epoch(fitted, Path(best))}
        extra["training"] = report.training.as_dict()
    save_model(fitted, config_snapshot(cfg), path, extra=file_extra)
    bank = report.bank
    extra |= {
        # The last validation epoch's metrics (trained models: not necessarily the best epoch's).
        "validation": dict(report.validation.metrics),
        "memory": {} if bank is None else dict(bank.memory),
        "timing": {"fit_s": fit_s, "sample_s": None if bank is None else bank.sample_s},
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
    print(f"results: {job.out_dir / RESULTS}")
    return results
