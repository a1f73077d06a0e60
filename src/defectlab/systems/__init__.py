"""Lightning systems: sequencing, logging and checkpoint state around the pure torch models.

Each system's ``fit`` / ``validate`` / ``test`` returns a typed report (:mod:`.reports`); memory
banks are fitted by the plain function :func:`.bank_fitting.fit_memory_bank`.
"""

from collections.abc import Mapping
from typing import Any

from torch import nn

from defectlab.errors import ConfigError
from defectlab.models.protocols import MemoryBankModel, TrainedModel
from defectlab.systems.bank_fitting import fit_memory_bank
from defectlab.systems.base import AnomalySystem
from defectlab.systems.memory_bank import MemoryBankSystem
from defectlab.systems.reports import (
    BankReport,
    FitReport,
    TestOutputs,
    TestReport,
    TrainingReport,
    ValidationReport,
)
from defectlab.systems.trained import TrainedSystem


def build_system(
    model: nn.Module, training: Mapping[str, Any] | None = None, **kwargs: Any
) -> AnomalySystem:
    """Wrap ``model`` in the system its contract calls for.

    Memory-bank models (:class:`MemoryBankModel`) are fitted in one pass; trained models
    (:class:`TrainedModel`) need ``training`` (the built ``model.fit`` config: optimizer, patience, ...).
    """
    if isinstance(model, MemoryBankModel):
        return MemoryBankSystem(model, **kwargs)
    if isinstance(model, TrainedModel):
        if training is None:
            raise ConfigError(
                f"{type(model).__name__} is trained by gradient descent: its model config needs "
                "a fit: section (optimizer, patience, max_epochs)"
            )
        return TrainedSystem(model, **training, **kwargs)
    raise TypeError(f"no Lightning system for {type(model).__name__}: neither embed/fit nor loss")


__all__ = [
    "AnomalySystem",
    "BankReport",
    "FitReport",
    "MemoryBankSystem",
    "TestOutputs",
    "TestReport",
    "TrainedSystem",
    "TrainingReport",
    "ValidationReport",
    "build_system",
    "fit_memory_bank",
]
