"""A run's folder: the portable config it records, and what a resumed sweep finds there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from defectlab.errors import ConfigError
from defectlab.model_file import MODEL_FILE
from defectlab.results import read_json, write_json_atomic

RESULTS, PREDICTIONS = "results.json", "predictions.json"
# Keys of the composed config whose values come from Hydra's runtime and are frozen on save.
_RUNTIME_KEYS = ("model_name", "backbone_name", "embedding_name", "data_name")


def config_snapshot(cfg: DictConfig) -> dict:
    """The run's config, portable: Hydra runtime values frozen, data_dir made absolute.

    ``paths.output_dir`` is cleared while the interpolations that use it (logger folders) stay,
    so evaluate.py points every output at its own folder and never writes into the training run.
    """
    snapshot = OmegaConf.to_container(cfg, resolve=False)
    snapshot.pop("hydra", None)
    for key in _RUNTIME_KEYS:
        snapshot[key] = cfg.get(key)
    snapshot["paths"]["data_dir"] = str(Path(cfg.paths.data_dir).resolve())
    snapshot["paths"]["output_dir"] = None
    return snapshot


def write_results(out_dir: Path, results: dict[str, Any], predictions: list | None = None) -> None:
    """``results.json`` (and ``predictions.json``) of a run, each written atomically."""
    write_json_atomic(out_dir / RESULTS, results)
    if predictions is not None:
        write_json_atomic(out_dir / PREDICTIONS, predictions)


def job_overrides() -> list[str]:
    """This job's command-line overrides (``resume=...`` left out); [] outside Hydra."""
    try:
        task = HydraConfig.get().overrides.task
    except ValueError:  # HydraConfig not set: called from Python, not through @hydra.main
        return []
    return sorted(o for o in task if o.partition("=")[0].lstrip("+~") != "resume")


def finished_results(out_dir: Path) -> dict[str, Any] | None:
    """results.json of a job that completed earlier with this job's overrides, else None.

    A failed, interrupted (no results.json) or differently configured job is run again.
    """
    path = out_dir / RESULTS
    if not path.is_file() or not (out_dir / MODEL_FILE).is_file():
        return None
    try:
        results = read_json(path)
    except ValueError:  # unreadable: run again (writes are atomic, so only a foreign file)
        return None
    if results.get("status") != "completed" or results.get("overrides") != job_overrides():
        return None
    return results


def optimized_value(results: dict[str, Any], key: str) -> float | None:
    """The value of ``optimized_metric``: a test metric, or a ``val_*`` validation metric."""
    if key in results.get("validation", {}):
        return results["validation"][key]
    if key.startswith("val_"):
        raise ConfigError(
            f"optimized_metric={key} was not computed: validation metrics need "
            "eval.validation_anomalies (val_synthetic_auroc) or data.val_dir (val_image_auroc)"
        )
    return results["metrics"].get(key)
