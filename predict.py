"""Score new images with a trained run: ``python predict.py run_dir=<run> input=<image|folder|glob>``.

Writes predictions.csv / predictions.json (score, normalised score, verdict at the saved
threshold; unreadable files listed and skipped) and, with save_images=true, one panel per image.
Examples:
    python predict.py run_dir=outputs/2026-11-23/12-18-31 input=new_parts/
    python predict.py run_dir=outputs/2026-11-23/12-18-31 input='line/**/*.png' save_images=false
    python predict.py run_dir=outputs/2026-11-23/12-18-31 input=/line/inbox watch=true
"""

import hydra
from omegaconf import DictConfig

from defectlab.inference import run_prediction


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Run the prediction job."""
    run_prediction(cfg)


if __name__ == "__main__":
    main()
