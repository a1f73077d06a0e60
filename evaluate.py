"""Re-test a trained model: ``python evaluate.py run_dir=<train run folder>`` (or ``ckpt_path=``).

Rebuilds data, model and thresholds from the checkpoint's embedded config, re-tests, writes a new
results folder and reports whether the training run's metrics are reproduced. Examples:
    python evaluate.py run_dir=outputs/2026-11-23/12-18-31
    python evaluate.py ckpt_path=outputs/.../checkpoints/model.ckpt data.category=poly
"""

import hydra
from omegaconf import DictConfig

from defectlab.runner import run_evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Run the evaluation job."""
    run_evaluation(cfg)


if __name__ == "__main__":
    main()
