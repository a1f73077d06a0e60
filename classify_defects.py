"""Which defect is it? ``python classify_defects.py run_dir=<run> support=<N per type|loo|all>``.

Writes accuracy, macro-F1, chance level and the confusion matrix to defect_types.json and plots/
in its own folder (outputs/classify_defects/<date>/<time>/, or hydra.run.dir=); the training run
is read, never modified. Examples:
    python classify_defects.py run_dir=outputs/2026-11-23/12-18-31 support=1
    python classify_defects.py run_dir=outputs/2026-11-23/12-18-31 support=loo method=knn k=3
    python classify_defects.py run_dir=... support=all query_dir=/line/rejected
"""

import hydra
from omegaconf import DictConfig

from defectlab.defect_types import run_classification


@hydra.main(version_base="1.3", config_path="conf", config_name="classify_defects")
def main(cfg: DictConfig) -> None:
    """Run the defect-type evaluation."""
    run_classification(cfg)


if __name__ == "__main__":
    main()
