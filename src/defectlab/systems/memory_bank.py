"""Lightning system for memory-bank models (PatchCore, FeatureKNN): one pass over train/good, no optimiser."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from defectlab.data.batch import Batch
from defectlab.errors import ConfigError
from defectlab.models.output import AnomalyOutput
from defectlab.models.protocols import MemoryBankModel
from defectlab.systems.bank_fitting import fit_memory_bank
from defectlab.systems.base import HELDOUT, AnomalySystem
from defectlab.systems.reports import FitReport


class MemoryBankSystem(AnomalySystem):
    """Build the memory bank with :func:`fit_memory_bank`, then calibrate on held-out images.

    Nothing is trained by gradient descent, so Lightning's training loop is not used: :meth:`fit`
    runs the one pass itself and ``trainer.validate`` for the held-out calibration.
    """

    model: MemoryBankModel

    def __init__(self, model: MemoryBankModel, **kwargs: Any) -> None:
        if not isinstance(model, MemoryBankModel):
            raise ConfigError(
                f"system=memory_bank fits memory-bank models (patchcore, feature_knn); "
                f"{type(model).__name__} is trained by gradient descent: use system=trained"
            )
        super().__init__(model, **kwargs)
        self.automatic_optimization = False

    def fit(self, trainer: L.Trainer, datamodule: L.LightningDataModule) -> FitReport:
        """Fit the bank(s) on ``datamodule``'s training images, then calibrate (held-out)."""
        datamodule.prepare_data()
        datamodule.setup("fit")
        held_out = datamodule.val_dataloader()
        if isinstance(held_out, list):  # [held-out good, labeled validation folder]
            held_out = held_out[HELDOUT]
        device = trainer.strategy.root_device
        self.to(device)
        bank = fit_memory_bank(
            self.model,
            datamodule.fit_set,
            datamodule.train_dataloader(),
            held_out=held_out,
            device=device,
        )
        return FitReport(validation=self.validate(trainer, datamodule), bank=bank)

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        raise ConfigError(
            "memory-bank systems are not fitted by trainer.fit: call system.fit(trainer, datamodule)"
        )

    def predict_images(self, images: torch.Tensor) -> AnomalyOutput:
        """``model.predict``: each model runs its backbone in slices of ``embed_batch`` images
        (bounded activation memory) and searches the whole batch at once."""
        return self.model.predict(images)

    @property
    def localizes(self) -> bool:
        return self.model.localizes
