"""Lightning system for models trained by gradient descent (CAE, U-Net)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn

from defectlab.components import SyntheticAnomalies
from defectlab.data.batch import Batch
from defectlab.errors import ConfigError, DefectlabError
from defectlab.models.protocols import TrainedModel
from defectlab.systems.base import HELDOUT, AnomalySystem
from defectlab.systems.reports import FitReport, TrainingReport

MONITOR = "val/loss"
BEST = "best"  # file name (without .ckpt) of the best-epoch checkpoint under checkpoints/
LR_SCHEDULES = ("constant", "cosine")  # system.lr_schedule


class TrainedSystem(AnomalySystem):
    """Train ``model.loss`` on train/good; stop early and keep the best epoch by held-out loss.

    While fitting, a validation epoch computes the held-out loss only: it picks the best epoch
    and stops early. Map statistics (``model.fit_statistics``) and thresholds (the base class's
    held-out calibration) belong to the kept weights, so :meth:`fit` computes them once, after
    restoring the best epoch, instead of after every epoch for weights that are then dropped.

    Supervised models (``model.supervised``) learn masks: synthetic ``anomalies`` are pasted onto
    the good images of each batch; real labeled defects (``data.labeled_anomalies``) bring their
    own masks. The held-out loss uses the same kinds of synthetic defects from a fixed seed, so
    epochs are compared on identical data.

    Args:
        model: pure torch model with ``loss`` and ``predict``.
        optimizer: ``params -> torch.optim.Optimizer`` (a Hydra partial).
        max_epochs: upper bound of training epochs; the trainer config reads it
            (``trainer.max_epochs: ${system.max_epochs}``), and :meth:`fit` refuses a trainer
            that disagrees.
        min_steps: optimiser steps before early stopping may end training (None = no floor);
            small data sets have few steps per epoch. The trainer reads it, as max_epochs.
        max_steps: stop after this many optimiser steps whatever max_epochs says (-1 = off).
        patience: validation epochs without improvement before stopping.
        min_delta: smallest decrease of the held-out loss that counts as improvement.
        anomalies: synthetic defect generator (supervised models need it unless they synthesise
            their own, e.g. the U-Net's ``feature_noise``).
        lr_schedule: ``constant`` or ``cosine`` (the learning rate falls to 0 over the run's
            step budget, per step).
        **kwargs: see :class:`AnomalySystem`.
    """

    model: TrainedModel

    def __init__(
        self,
        model: TrainedModel,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        max_epochs: int = 100,
        min_steps: int | None = None,
        max_steps: int = -1,
        patience: int = 10,
        min_delta: float = 0.0,
        anomalies: SyntheticAnomalies | None = None,
        lr_schedule: str = "constant",
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, TrainedModel):
            raise ConfigError(
                f"system=trained trains models with a loss (cae, unet); {type(model).__name__} "
                "is a memory-bank model: use system=memory_bank"
            )
        super().__init__(model, **kwargs)
        if patience < 1:
            raise ConfigError(f"system.patience must be >= 1, got {patience}")
        if lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"system.lr_schedule={lr_schedule}: choose one of {LR_SCHEDULES}")
        if self.supervised and anomalies is None and not model.synthesizes_defects:
            raise ConfigError(
                f"{type(model).__name__} is supervised: set system.anomalies (synthetic defects, "
                "e.g. system=supervised) or model.feature_noise"
            )
        self.optimizer_factory = optimizer
        self.max_epochs = max_epochs
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.patience = patience
        self.min_delta = min_delta
        self.anomalies = anomalies
        self.lr_schedule = lr_schedule
        self.val_loss_history: list[float] = []  # mean held-out loss per epoch
        self._val_loss = [0.0, 0]  # running sum, count

    @property
    def supervised(self) -> bool:
        return self.model.supervised

    def fit(self, trainer: L.Trainer, datamodule: L.LightningDataModule) -> FitReport:
        """Train with early stopping on the held-out loss; the last epoch's validation metrics."""
        for key, trainer_value, value in (
            ("max_epochs", trainer.max_epochs, self.max_epochs),
            ("min_steps", trainer.min_steps, self.min_steps),
            ("max_steps", trainer.max_steps, self.max_steps),
        ):
            if trainer_value != value:
                raise ConfigError(
                    f"trainer.{key}={trainer_value} but system.{key}={value}: "
                    f"set system.{key} (the trainer config reads it)"
                )
        trainer.fit(self, datamodule=datamodule)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            raise DefectlabError("training ended before a validation epoch: no checkpoint")
        best_epoch = self.restore_epoch(Path(best))
        # Once, for the weights that are kept: statistics first (calibration scores use them).
        # Done after every epoch instead, the U-Net with model.flip_average and
        # model.pixel_statistics ran 4 forwards per good training image per epoch: synthetic
        # brick fit 1713 s against 329 s now, same losses and metrics (docs/methods/unet.md).
        self.eval()  # train mode would update the encoder standardisation's running stats
        self.model.fit_statistics(self._good_training_images(datamodule))
        validation = self.validate(trainer, datamodule)
        training = TrainingReport.from_history(
            self.val_loss_history, trainer.max_epochs, best_epoch=best_epoch
        )
        return FitReport(validation=validation, training=training)

    def restore_epoch(self, checkpoint_path: Path) -> int:
        """Load an epoch's weights from a Lightning checkpoint of this run; its epoch (1-).

        The checkpoint was written by this training run a moment ago; torch's weights-only reader
        still refuses anything but tensors and plain containers.
        """
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])
        return int(checkpoint["epoch"]) + 1

    def _loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        images = batch["image"]
        if not self.supervised:
            return self.model.loss(images)
        masks = batch.get("mask")
        masks = torch.zeros_like(images[:, :1]) if masks is None else masks.float()
        if self.anomalies is not None:
            pasted, new = self.anomalies(images, generator)
            good = (batch["label"] == 0).view(-1, 1, 1, 1)  # real defects keep their own mask
            images = torch.where(good, pasted, images)
            masks = torch.where(good, torch.maximum(masks, new), masks)
        if generator is None:
            return self.model.loss(images, masks)
        # Models that synthesise defects themselves (feature noise) draw them from it too.
        return self.model.loss(images, masks, generator=generator)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = HELDOUT) -> None:
        # Fitting: the held-out loss only (best epoch, early stopping). Afterwards (see fit):
        # scores for the kept weights' calibration only; their loss would be discarded.
        if self.trainer.state.fn != "fit":
            super().validation_step(batch, batch_idx, dataloader_idx)
            return
        if dataloader_idx != HELDOUT:
            return
        generator = None
        if self.supervised:
            seed = 0 if self.anomalies is None else self.anomalies.seed
            generator = torch.Generator().manual_seed(seed + 1 + batch_idx)
        loss = self._loss(batch, generator)
        self._val_loss[0] += float(loss) * len(batch["image"])
        self._val_loss[1] += len(batch["image"])
        self.log(
            MONITOR,
            loss,
            prog_bar=True,
            on_epoch=True,
            add_dataloader_idx=False,
            batch_size=len(batch["image"]),
        )

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_loss = [0.0, 0]

    def _good_training_images(self, datamodule: L.LightningDataModule) -> Iterator[torch.Tensor]:
        # Lazy: a model without statistics never reads the training set.
        for batch in datamodule.train_dataloader():
            good = batch["label"] == 0  # real labeled defects (U-Net) are not normal
            if good.any():
                yield batch["image"][good].to(self.device)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._val_loss[1]:  # only fitting epochs compute it
            self.val_loss_history.append(self._val_loss[0] / self._val_loss[1])

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        # Frozen encoder weights have no gradient: leave them out of the optimiser's state.
        optimizer = self.optimizer_factory(p for p in self.model.parameters() if p.requires_grad)
        if self.lr_schedule == "constant":
            return optimizer
        # cosine: the learning rate falls to 0 over the run's step budget (max_steps, or
        # max_epochs x batches), updated every step; early stopping may end it sooner.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_callbacks(self) -> list[Callback]:
        """Early stopping and best-epoch checkpointing on the held-out loss (while fitting)."""
        if self.trainer.state.fn != "fit":
            return []
        return [
            EarlyStopping(monitor=MONITOR, patience=self.patience, min_delta=self.min_delta),
            ModelCheckpoint(
                dirpath=Path(self.trainer.default_root_dir) / "checkpoints",
                filename=BEST,
                monitor=MONITOR,
                save_top_k=1,
                enable_version_counter=False,
            ),
        ]
