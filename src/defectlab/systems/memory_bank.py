"""Lightning system for memory-bank models (PatchCore, FeatureKNN): one pass over train/good, no optimiser."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from defectlab.systems.base import AnomalySystem


class MemoryBankSystem(AnomalySystem):
    """Collect patch embeddings of the training images, then build the memory bank once.

    Nothing is trained by gradient descent, so automatic optimisation is off (no dummy loss).
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.automatic_optimization = False
        self._embeddings: list[torch.Tensor] = []
        self.sample_s: float | None = None

    def on_train_epoch_start(self) -> None:
        self._embeddings = []

    def training_step(self, batch: dict, batch_idx: int) -> None:
        emb = self.model.embed(batch["image"])
        self._embeddings.append(emb.reshape(-1, emb.shape[-1]))

    def _build_bank(self) -> None:
        if not self._embeddings:
            return
        embeddings = torch.cat(self._embeddings)
        self._embeddings = []
        start = time.perf_counter()
        self.model.fit(embeddings)
        self.sample_s = time.perf_counter() - start

    # Lightning runs validation before on_train_epoch_end, so the bank is built by whichever comes
    # first; one epoch is all a memory bank needs.
    def on_validation_epoch_start(self) -> None:
        self._build_bank()
        super().on_validation_epoch_start()

    def on_train_epoch_end(self) -> None:
        self._build_bank()
        self.trainer.should_stop = True
