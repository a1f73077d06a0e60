"""The training job behind ``train.py``: compose, fit, calibrate, test, write results."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from defectlab.errors import DefectlabError
from defectlab.results import format_summary, peak_rss_mb, write_json_atomic
from defectlab.systems import build_system

# Intended, not problems: frozen backbones stay in eval mode, memory banks have no optimiser.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned `None`.*")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets defectlab's own errors through unwrapped.

    Hydra wraps constructor errors in InstantiationException, whose repr buries our message
    (which already names the config key and what to do).
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, DefectlabError):
            raise err.__cause__ from None
        raise


def _build_all(group: DictConfig | None) -> list:
    return [build(node) for node in (group or {}).values() if node is not None]


def save_checkpoint_atomic(trainer: L.Trainer, path: Path) -> None:
    """Save to a temporary name, then rename: an interrupted save never leaves a loadable stub."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp)
    tmp.replace(path)


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Fit ``cfg.model`` on ``cfg.data``, test it and write ``results.json`` into the output dir."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = build(cfg.data)
    system = build_system(build(cfg.model), threshold=OmegaConf.to_container(cfg.eval.threshold))
    trainer = build(
        cfg.trainer,
        logger=_build_all(cfg.get("logger")) or False,
        callbacks=_build_all(cfg.get("callbacks")),
    )

    start = time.perf_counter()
    trainer.fit(system, datamodule=datamodule)
    fit_s = time.perf_counter() - start

    ckpt = out_dir / "checkpoints" / "model.ckpt"
    save_checkpoint_atomic(trainer, ckpt)
    start = time.perf_counter()
    # Test what was saved: the checkpoint alone must reproduce these numbers.
    trainer.test(system, datamodule=datamodule, ckpt_path=str(ckpt))
    test_s = time.perf_counter() - start

    n_test = len(datamodule.test_set)
    bank = getattr(system.model, "memory_bank", None)
    results = {
        "category": cfg.data.category,
        "data": cfg.data_name,
        "model": cfg.model_name,
        "backbone": cfg.backbone_name,
        "metrics": system.test_results["metrics"],
        "threshold": system.test_results["threshold"],
        "timing": {
            "fit_s": fit_s,
            "sample_s": getattr(system, "sample_s", None),
            "test_s": test_s,
            "test_images_per_s": n_test / test_s,
        },
        "memory": {
            "peak_rss_mb": peak_rss_mb(),
            "bank_mb": 0.0 if bank is None else bank.numel() * bank.element_size() / 2**20,
            "bank_shape": None if bank is None else list(bank.shape),
        },
        "counts": {
            "train": len(datamodule.fit_set),
            "holdout": len(datamodule.val_set),
            "test": n_test,
            "test_defective": sum(s.label for s in datamodule.index.test),
        },
        "checkpoint": str(ckpt.resolve()),
        "seed": cfg.seed,
    }
    write_json_atomic(out_dir / "results.json", results)
    write_json_atomic(out_dir / "predictions.json", system.test_results["predictions"])
    print(format_summary(results))
    print(f"results: {out_dir / 'results.json'}")
    return results
