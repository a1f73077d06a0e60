"""The test pass every job ends with: test the system, then write results, predictions, plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from defectlab.experiment_log import log_run
from defectlab.jobs.results import assemble_results
from defectlab.jobs.run_folder import write_results
from defectlab.jobs.setup import Job
from defectlab.visualize import save_run_plots


def test_and_report(job: Job, model_file: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Test ``job.system`` (loaded from ``model_file``), then write results, predictions, plots.

    ``extra``: see :func:`defectlab.jobs.results.assemble_results`.
    """
    start = time.perf_counter()
    tested = job.system.test(job.trainer, job.datamodule)
    test_s = time.perf_counter() - start
    results = assemble_results(job, tested, model_file, test_s, extra)
    plots = {}
    if job.cfg.eval.plots:
        plots = save_run_plots(vars(tested.outputs), tested.summary(), job.out_dir / "plots")
        results["plots"] = {k: str(v) for k, v in plots.items()}
    log_run(job.trainer.loggers, job.cfg, results, plots, job.image_writer.folder)
    write_results(job.out_dir, results, tested.predictions)
    return results
