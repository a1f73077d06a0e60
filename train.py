"""Train and test one configuration: ``python train.py [group=option ...] [key=value ...]``.

Examples:
    python train.py                                   # PatchCore + EfficientNet-Lite0 on ELPV mono
    python train.py data.category=poly model.k=1
    python train.py data=mvtec data.root=/data/mvtec_ad data.category=bottle backbone=wide_resnet50_2
    python train.py -m data.category=mono,poly        # one job per category under multirun/
"""

import hydra
from omegaconf import DictConfig

from defectlab.runner import run_training


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run the job and return the optimized metric (for Hydra sweepers)."""
    return run_training(cfg)["metrics"].get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
