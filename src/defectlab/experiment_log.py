"""What a finished run sends to its experiment loggers (wandb, TensorBoard, CSV).

Scalar test metrics are logged by the Lightning system while testing; this adds what only exists
once the run is over: the resolved config, timings and memory, the per-defect-type table, the
plots and example heatmap panels. Each logger gets what it supports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

TABLE_COLUMNS = ("defect_type", "n", "image_auroc", "image_recall", "detected", "pixel_aupro")


def sweep_id() -> str | None:
    """``<date>_<time>`` of the running Hydra multirun (the wandb group of its jobs), else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hydra_cfg.sweep.dir)
    return f"{sweep_dir.parent.name}_{sweep_dir.name}"


# conf/logger/wandb.yaml: group: ${sweep_id:} puts the jobs of one multirun into one wandb group.
OmegaConf.register_new_resolver("sweep_id", sweep_id, replace=True)


def _scalars(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for section in ("timing", "memory"):
        for key, value in (results.get(section) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{section}/{key}"] = float(value)
    training = results.get("training") or {}
    for key in ("epochs", "best_epoch", "best_val_loss"):
        if training.get(key) is not None:
            out[f"training/{key}"] = float(training[key])
    return out


def _examples(folder: Path, per_type: int = 2) -> dict[str, list[Path]]:
    """The first ``per_type`` written panels of every defect-type folder."""
    if not folder.is_dir():
        return {}
    return {
        d.name: sorted(d.glob("*.png"))[:per_type]
        for d in sorted(p for p in folder.iterdir() if p.is_dir())
        if any(d.glob("*.png"))
    }


def log_run(
    loggers: Sequence[Logger],
    cfg: DictConfig,
    results: dict[str, Any],
    plots: dict[str, Path],
    images_folder: Path,
) -> None:
    """Send config, costs, tables, plots and example panels of a finished run to ``loggers``."""
    # Key by key: the composed hydra node has interpolations that only resolve inside Hydra's run.
    config = {
        key: OmegaConf.to_container(cfg[key], resolve=True)
        if OmegaConf.is_config(cfg[key])
        else cfg[key]
        for key in cfg
        if key != "hydra"
    }
    rows = [
        [name, *(row.get(c) for c in TABLE_COLUMNS[1:])]
        for name, row in (results.get("per_defect_type") or {}).items()
    ]
    examples = _examples(images_folder)
    for logger in loggers:
        logger.log_hyperparams(config)
        logger.log_metrics(_scalars(results))
        if hasattr(logger, "log_table"):  # wandb
            logger.log_table(key="per_defect_type", columns=list(TABLE_COLUMNS), data=rows)
        if hasattr(logger, "log_image"):  # wandb; CSV and TensorBoard keep the PNG files only
            for name, path in plots.items():
                logger.log_image(key=f"plots/{name}", images=[str(path)])
            for defect_type, paths in examples.items():
                logger.log_image(
                    key=f"examples/{defect_type}",
                    images=[str(p) for p in paths],
                    caption=[p.stem for p in paths],
                )
        logger.save()


def finish(loggers: Sequence[Logger]) -> None:
    """Close wandb runs (the next job of a sweep must get its own run) and say how to upload."""
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        run_dir = Path(run.dir).parent
        offline = bool(getattr(run.settings, "_offline", False))
        run.finish()
        if offline:
            print(f"wandb: offline run saved in {run_dir}; upload it with `wandb sync {run_dir}`")
