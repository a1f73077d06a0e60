"""The jobs behind ``train.py`` and ``evaluate.py``: build -> fit -> calibrate -> test -> report.

``setup`` builds one job's objects and checks settings across config groups, ``train`` and
``evaluate`` run the two jobs, ``testing`` is the test pass both end with, ``results`` assembles
``results.json``, ``run_folder`` holds what a run folder records and what a resumed sweep reads.
"""

from defectlab.jobs.evaluate import run_evaluation
from defectlab.jobs.run_folder import config_snapshot, finished_results, optimized_value
from defectlab.jobs.setup import Job, build_job
from defectlab.jobs.train import run_training

__all__ = [
    "Job",
    "build_job",
    "config_snapshot",
    "finished_results",
    "optimized_value",
    "run_evaluation",
    "run_training",
]
