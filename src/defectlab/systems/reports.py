"""What a system hands back to the jobs: one small typed report per step, not attributes on the side.

``fit`` returns a :class:`FitReport` (held-out validation metrics, plus how the memory bank was
built or how training went), ``validate`` a :class:`ValidationReport`, ``test`` a
:class:`TestReport` (the metrics summary, deployed threshold, per-image predictions and the raw
tensors the plots need).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ValidationReport:
    """Metrics on validation data only (synthetic defects, ``data.val_dir``), never the test set."""

    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BankReport:
    """How a memory bank was built: the training-embedding buffer(s) and the bank-building time.

    ``memory``: ``train_vectors``, ``dim``, ``buffer_dtype``, ``storage``, ``chunk_vectors``,
    ``buffer_mb``, ``spill_mb``, ``expected_bank_rows``, ``expected_bank_mb`` (ensembles: totals
    and ``members``), as written to results.json's ``memory`` section.
    """

    memory: dict[str, Any]
    sample_s: float


@dataclass(frozen=True)
class TrainingReport:
    """Gradient training: epochs run, the best (checkpointed) epoch and the held-out loss curve."""

    epochs: int
    max_epochs: int | None
    stopped_early: bool
    best_epoch: int | None
    best_val_loss: float | None
    val_loss_history: list[float]

    @classmethod
    def from_history(
        cls, history: list[float], max_epochs: int | None, best_epoch: int | None = None
    ) -> TrainingReport:
        """Report of a run whose held-out losses per epoch were ``history``.

        ``best_epoch`` (1-): the epoch that was checkpointed and kept; None = the lowest loss.
        """
        if best_epoch is not None and not 1 <= best_epoch <= len(history):
            raise ValueError(f"best epoch {best_epoch} outside the {len(history)} epochs run")
        if best_epoch is not None:
            best: int | None = best_epoch - 1
        else:
            best = min(range(len(history)), key=history.__getitem__) if history else None
        return cls(
            epochs=len(history),
            max_epochs=max_epochs,
            stopped_early=len(history) < (max_epochs or 0),
            best_epoch=None if best is None else best + 1,
            best_val_loss=None if best is None else history[best],
            val_loss_history=list(history),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FitReport:
    """What fitting produced besides the fitted model.

    Exactly one of ``bank`` (memory-bank models) and ``training`` (gradient-trained models) is set.
    """

    validation: ValidationReport
    bank: BankReport | None = None
    training: TrainingReport | None = None


@dataclass(frozen=True)
class TestOutputs:
    """Raw test tensors for the plots: scores / labels ``(N,)``, maps / masks ``(N, 1, H, W)``."""

    __test__ = False  # not a pytest test class

    scores: torch.Tensor
    labels: torch.Tensor
    defect_types: list[str]
    maps: torch.Tensor | None
    masks: torch.Tensor | None


@dataclass(frozen=True)
class TestReport:
    """One test pass: :func:`defectlab.metrics.summarize`'s sections, threshold, predictions.

    ``threshold``: the threshold config and the calibration in force; ``predictions``: one row per
    image (path, defect type, label, raw and normalised score, predicted label).
    """

    __test__ = False  # not a pytest test class

    metrics: dict[str, Any]
    confusion_matrix: dict[str, Any]
    oracle: dict[str, Any]
    per_defect_type: dict[str, dict[str, Any]]
    localization: bool
    threshold: dict[str, Any]
    predictions: list[dict[str, Any]]
    outputs: TestOutputs

    def summary(self) -> dict[str, Any]:
        """The sections results.json and the plots read (everything but predictions and tensors)."""
        return {
            "metrics": self.metrics,
            "confusion_matrix": self.confusion_matrix,
            "oracle": self.oracle,
            "per_defect_type": self.per_defect_type,
            "localization": self.localization,
            "threshold": self.threshold,
        }
