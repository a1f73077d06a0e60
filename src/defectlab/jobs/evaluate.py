"""The job behind ``evaluate.py``: re-test a trained model file into a new results folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from defectlab.experiment_log import finish
from defectlab.jobs.run_folder import RESULTS, write_results
from defectlab.jobs.setup import build_job
from defectlab.jobs.testing import test_and_report
from defectlab.model_file import load_model, locate_model
from defectlab.results import compare_metrics, format_summary, read_json


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
        write_results(out_dir, results)
        print(f"matches {reference}: max |difference| over all metrics = {diff:.3g}")
    finish(job.trainer.loggers)
    print(format_summary(results))
    print(f"results: {out_dir / RESULTS}")
    return results
