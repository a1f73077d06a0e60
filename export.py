"""Export a trained run as one deployable file: ``python export.py run_dir=<run> format=onnx``.

Writes <run>/export/model.onnx (or model.pt for format=torchscript) and a sidecar YAML, after
checking on the run's own test images that the file reproduces the trained model.
Examples:
    python export.py run_dir=outputs/2026-11-23/12-18-31
    python export.py run_dir=outputs/2026-11-23/12-18-31 format=torchscript
"""

import hydra
from omegaconf import DictConfig

from defectlab.export import export_run


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    """Run the export job."""
    export_run(cfg)


if __name__ == "__main__":
    main()
