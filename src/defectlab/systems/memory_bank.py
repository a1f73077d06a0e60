"""Lightning system for memory-bank models (PatchCore, FeatureKNN): one pass over train/good, no optimiser."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from defectlab.components.bank_buffer import EmbeddingBuffer
from defectlab.components.sampler import num_samples
from defectlab.errors import ConfigError
from defectlab.systems.base import AnomalySystem

log = logging.getLogger(__name__)


def embedding_rows(model: nn.Module, images: torch.Tensor) -> Iterator[torch.Tensor]:
    """``(n, D)`` embedding rows of ``images``, in slices of ``model.embed_batch`` images.

    Smaller forwards bound the activation memory (~15 MB per 224 px image for PatchCore's
    1024-channel maps) and were no slower on CPU; each image's features do not depend on them.
    """
    for part in images.split(getattr(model, "embed_batch", None) or len(images)):
        emb = model.embed(part)
        yield emb.reshape(-1, emb.shape[-1])


class MemoryBankSystem(AnomalySystem):
    """Stream embeddings of the training images into one buffer, then build the memory bank once.

    Nothing is trained by gradient descent, so automatic optimisation is off (no dummy loss).
    Before extraction, one training image is embedded to size the buffer (rows per image x
    training images); the expected buffer and bank sizes are logged and ``model.k`` is checked
    against the bank, so a bad value fails before the heavy work. Models with
    ``embedding_buffer``/``fit_buffer`` (PatchCore) choose dtype, disk spill or chunking.
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.automatic_optimization = False
        self._buffer: EmbeddingBuffer | None = None
        self.sample_s: float | None = None
        self.memory_stats: dict[str, Any] = {}

    @torch.no_grad()
    def on_train_start(self) -> None:
        dataset = self.trainer.train_dataloader.dataset
        first = dataset[0]["image"].unsqueeze(0).to(self.device)
        self._buffer = self._new_buffer(next(embedding_rows(self.model, first)))
        k = getattr(self.model, "k", 1)
        rows = self.memory_stats["expected_bank_rows"]
        if k > rows:
            raise ConfigError(
                f"model.k={k} exceeds the memory bank's {rows} rows "
                f"({len(dataset)} training images, {self.memory_stats['train_vectors']} vectors "
                "before sampling): lower model.k, raise sampler.ratio or add training images"
            )

    def training_step(self, batch: dict, batch_idx: int) -> None:
        for rows in embedding_rows(self.model, batch["image"]):
            self._buffer.add(rows)

    def _new_buffer(self, rows: torch.Tensor) -> EmbeddingBuffer:
        """The model's buffer, sized from one image's ``rows``; logs the expected sizes."""
        model = self.model
        per_image = len(rows)
        total = per_image * len(self.trainer.train_dataloader.dataset)
        make = getattr(model, "embedding_buffer", None)
        dim = rows.shape[1]
        buffer = (
            make(total, dim, rows.device)
            if make
            else EmbeddingBuffer(total, dim, device=rows.device)
        )
        chunk = getattr(model, "chunk_vectors", None)
        ratio = getattr(getattr(model, "sampler", None), "ratio", 1.0)
        bank_rows = (
            sum(num_samples(min(chunk, total - s), ratio) for s in range(0, total, chunk))
            if chunk
            else num_samples(total, ratio)
        )
        self.memory_stats = {
            "train_vectors": total,
            "dim": dim,
            "buffer_dtype": str(buffer.dtype).removeprefix("torch."),
            "storage": buffer.storage,
            "chunk_vectors": chunk,
            # Rows held in memory while extracting; on disk, the temporary file's size.
            "buffer_mb": buffer.nbytes / 2**20,
            "spill_mb": (total * buffer.row_bytes if buffer.storage == "disk" else 0) / 2**20,
            "expected_bank_rows": bank_rows,
            "expected_bank_mb": bank_rows * dim * 4 / 2**20,
        }
        where = (
            f"{self.memory_stats['spill_mb']:.0f} MB temporary file (projections in memory)"
            if buffer.storage == "disk"
            else f"{self.memory_stats['buffer_mb']:.0f} MB buffer"
        )
        log.info(
            "memory bank: %d images x %d vectors = %d vectors x %d %s -> %s%s; "
            "bank after sampling: %d rows, %.1f MB",
            total // per_image,
            per_image,
            total,
            dim,
            self.memory_stats["buffer_dtype"],
            where,
            f" (chunks of {chunk} vectors)" if chunk else "",
            bank_rows,
            self.memory_stats["expected_bank_mb"],
        )
        return buffer

    def _build_bank(self) -> None:
        if self._buffer is None or not self._buffer.seen:
            return
        buffer, self._buffer = self._buffer, None
        start = time.perf_counter()
        fit_buffer = getattr(self.model, "fit_buffer", None)
        if fit_buffer is not None:
            fit_buffer(buffer)
        else:
            self.model.fit(buffer.finish())
        del buffer
        self.sample_s = time.perf_counter() - start

    # Lightning runs validation before on_train_epoch_end, so the bank is built by whichever comes
    # first; one epoch is all a memory bank needs.
    def on_validation_epoch_start(self) -> None:
        self._build_bank()
        super().on_validation_epoch_start()

    def on_train_epoch_end(self) -> None:
        self._build_bank()
        self.trainer.should_stop = True
