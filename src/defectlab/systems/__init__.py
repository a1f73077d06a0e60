"""Lightning systems: sequencing, logging and checkpoint state around the pure torch models.

Each system's ``fit`` / ``validate`` / ``test`` returns a typed report (:mod:`.reports`); memory
banks are fitted by the plain function :func:`.bank_fitting.fit_memory_bank`. Which system wraps
a model is configuration: the ``system`` group, chosen by each model's defaults (conf/system/).
"""

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
    "fit_memory_bank",
]
