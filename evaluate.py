"""Re-test a trained model: ``python evaluate.py run_dir=<train run folder>`` (or ``model_path=``).

Loads the run's model file (docs/model-files.md), rebuilds data and thresholds from the config it
holds, re-tests, writes a new results folder and reports whether the training run's metrics are
reproduced. Examples:
    python evaluate.py run_dir=outputs/2026-11-23/12-18-31
    python evaluate.py model_path=outputs/.../checkpoints/model.safetensors data.category=poly
"""

import hydra
from omegaconf import DictConfig

from defectlab.jobs import run_evaluation


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Run the evaluation job."""
    run_evaluation(cfg)


if __name__ == "__main__":
    main()
