"""Inspection web app: ``python app.py run_dir=<run>``, then open http://127.0.0.1:7860.

Pick a trained run, upload images, see original | heatmap | overlay with score and verdict, and
move the threshold live. Examples:
    python app.py run_dir=outputs/2026-11-23/12-18-31
    python app.py runs=[multirun/2026-11-23/14-02-11] host=0.0.0.0 port=8080
"""

import hydra
from omegaconf import DictConfig

from defectlab.app import run_app


@hydra.main(version_base="1.3", config_path="conf", config_name="app")
def main(cfg: DictConfig) -> None:
    """Serve the app until Ctrl-C."""
    run_app(cfg)


if __name__ == "__main__":
    main()
