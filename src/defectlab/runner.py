"""Former home of the train and evaluate jobs, now :mod:`defectlab.jobs`; kept for old imports."""

from defectlab.build import build
from defectlab.jobs import (
    Job,
    build_job,
    config_snapshot,
    finished_results,
    optimized_value,
    run_evaluation,
    run_training,
)

__all__ = [
    "Job",
    "build",
    "build_job",
    "config_snapshot",
    "finished_results",
    "optimized_value",
    "run_evaluation",
    "run_training",
]
