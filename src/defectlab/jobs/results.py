"""``results.json`` of a run: the tested system's numbers, costs, provenance and data issues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from defectlab.components import FeatureExtractor
from defectlab.jobs.setup import Job
from defectlab.models import PatchCore
from defectlab.models.protocols import memory_banks
from defectlab.provenance import provenance
from defectlab.results import peak_rss_mb
from defectlab.systems.reports import TestReport


def _uses(model: torch.nn.Module, kind: type) -> bool:
    """True if ``model`` is or contains a ``kind`` module (ensembles hold one per member)."""
    return any(isinstance(module, kind) for module in model.modules())


def assemble_results(
    job: Job, tested: TestReport, model_file: Path, test_s: float, extra: dict[str, Any]
) -> dict[str, Any]:
    """The results dict of ``job`` after testing (``tested``: the system's test report).

    ``extra`` adds top-level entries (``validation``: the fit's metrics, else none); its
    ``timing``, ``memory`` and ``counts`` are merged into those sections.
    """
    extra = dict(extra)
    cfg, system, datamodule = job.cfg, job.system, job.datamodule
    category = cfg.data.category
    n_test = len(datamodule.test_set)
    banks = memory_banks(system.model)
    return {
        "status": "completed",
        "category": category,
        "data": cfg.data_name,
        "model": cfg.model_name,
        # CAE and U-Net learn their own features: the backbone config does not apply to them.
        "backbone": cfg.backbone_name if _uses(system.model, FeatureExtractor) else None,
        # Patch-feature layout (embedding= group) of PatchCore; earlier runs had the paper's.
        "embedding": cfg.get("embedding_name") if _uses(system.model, PatchCore) else None,
        "metrics": tested.metrics,
        # Held-out validation metrics (never the test set): what hyper-parameter searches optimise.
        # Set by the training job from its fit report; a re-test has none of its own.
        "validation": extra.pop("validation", {}),
        "confusion_matrix": tested.confusion_matrix,
        "oracle": tested.oracle,
        "localization": tested.localization,
        "per_defect_type": {f"{category}/{k}": v for k, v in tested.per_defect_type.items()},
        "threshold": tested.threshold,
        "timing": {
            **extra.pop("timing", {}),
            "test_s": test_s,
            "test_images_per_s": n_test / test_s,
        },
        "memory": {
            "peak_rss_mb": peak_rss_mb(),
            "bank_mb": sum(b.numel() * b.element_size() for b in banks) / 2**20 if banks else None,
            "parameters": sum(p.numel() for p in system.model.parameters()),
            # One bank: its shape; several (model.scales=two, backbone=ensemble): bank_shapes.
            "bank_shape": list(banks[0].shape) if len(banks) == 1 else None,
            "bank_shapes": [list(b.shape) for b in banks],
            # Training-embedding buffer of memory-bank models (size, dtype, chunking): from fitting.
            **extra.pop("memory", {}),
        },
        "counts": {
            "test": n_test,
            "skipped_files": len(datamodule.skipped),
            "test_defective": sum(s.label for s in datamodule.test_set.samples),
            "labeled_anomalies": dict(datamodule.labeled_counts),
            **extra.pop("counts", {}),
        },
        "model_file": str(model_file.resolve()),
        "seed": cfg.seed,
        "provenance": provenance(cfg, system.model, banks),
        # on_bad_file=skip: what was left out, and masks with no image (ignored either way).
        "data_issues": {
            "skipped_files": list(datamodule.skipped),
            "orphan_masks": [str(p) for p in datamodule.index.orphan_masks],
        },
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "images": {"folder": str(job.image_writer.folder), "written": job.image_writer.count},
        **extra,
    }
