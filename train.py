"""Train and test one configuration: ``python train.py [group=option ...] [key=value ...]``.

Examples:
    python train.py                                   # PatchCore + EfficientNet-Lite0 on ELPV mono
    python train.py data.category=poly model.k=1
    python train.py data=mvtec data.root=/data/mvtec_ad data.category=bottle backbone=wide_resnet50_2
    python train.py -m data.category=mono,poly        # one job per category under multirun/
    python train.py -m data.category=mono,poly hydra.sweep.dir=multirun/elpv resume=true
                                                      # re-run: finished jobs are skipped
"""

import logging
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from defectlab.jobs import finished_results, optimized_value, run_training
from defectlab.sweep import record_failure

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run the job and return the optimized metric (for Hydra sweepers).

    In a multirun a failing job (bad category, out of memory, ...) is recorded in its folder and
    in the sweep summary, and returns NaN, so the other jobs run and keep their results; a single
    run raises as usual. With ``resume=true`` a job whose folder already holds completed results
    for the same overrides is skipped (failed and interrupted jobs run again).
    """
    if cfg.resume:
        done = finished_results(Path(cfg.paths.output_dir))
        if done is not None:
            log.info(
                "resume=true: %s finished earlier with these overrides; skipped", done["model_file"]
            )
            print(f"skipped (finished earlier): {cfg.paths.output_dir}")
            return optimized_value(done, cfg.optimized_metric)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return optimized_value(run_training(cfg), cfg.optimized_metric)
    try:
        return optimized_value(run_training(cfg), cfg.optimized_metric)
    except Exception as err:  # any failure of this job must not end the sweep
        record_failure(Path(cfg.paths.output_dir), cfg, err)
        log.exception("job failed; recorded in %s/results.json", cfg.paths.output_dir)
        return math.nan


if __name__ == "__main__":
    main()
