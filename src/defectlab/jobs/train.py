"""The job behind ``train.py``: build, fit, save the model file, test it as loaded, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from defectlab.experiment_log import finish
from defectlab.jobs.run_folder import RESULTS, config_snapshot, job_overrides
from defectlab.jobs.setup import build_job
from defectlab.jobs.testing import test_and_report
from defectlab.model_file import MODEL_FILE, load_model, save_model
from defectlab.results import format_summary


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
        # The best epoch (restored by fit) is the model that is saved and tested.
        file_extra["training"] = {"epoch": report.training.best_epoch}
        extra["training"] = report.training.as_dict()
    save_model(fitted, config_snapshot(cfg), path, extra=file_extra)
    bank = report.bank
    extra |= {
        # Validation metrics of the kept model (trained models: the best epoch's).
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
