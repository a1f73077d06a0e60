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
from defectlab.models import PatchCoreEnsemble
from defectlab.systems.base import HELDOUT, AnomalySystem

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
        # One buffer per memory-bank model: the model itself, or each member of an ensemble.
        self._bank_buffers: list[EmbeddingBuffer] | None = None
        self.sample_s: float | None = None
        self.memory_stats: dict[str, Any] = {}

    @torch.no_grad()
    def on_train_start(self) -> None:
        dataset = self.trainer.train_dataloader.dataset
        wanted = min(self.model.prepare_images, len(dataset))
        if wanted:  # e.g. the embedding's projection, fitted on evenly spaced training images
            picks = torch.linspace(0, len(dataset) - 1, wanted).round().long().unique().tolist()
            self.model.prepare(torch.stack([dataset[i]["image"] for i in picks]).to(self.device))
        first = dataset[0]["image"].unsqueeze(0).to(self.device)
        stats, self._bank_buffers = [], []
        for model in self.model.bank_models():
            buffer, stat = self._new_buffer(model, next(embedding_rows(model, first)))
            self._bank_buffers.append(buffer)
            stats.append(stat)
            k, rows = getattr(model, "k", 1), stat["expected_bank_rows"]
            if k > rows:
                raise ConfigError(
                    f"model.k={k} exceeds the memory bank's {rows} rows "
                    f"({len(dataset)} training images, {stat['train_vectors']} vectors "
                    "before sampling): lower model.k, raise sampler.ratio or add training images"
                )
        names = list(getattr(self.model, "members", {"": None}))
        self.memory_stats = stats[0] if len(stats) == 1 else _ensemble_stats(names, stats)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        for model, buffer in zip(self.model.bank_models(), self._bank_buffers, strict=True):
            for rows in embedding_rows(model, batch["image"]):
                buffer.add(rows)

    def _new_buffer(
        self, model: nn.Module, rows: torch.Tensor
    ) -> tuple[EmbeddingBuffer, dict[str, Any]]:
        """``model``'s buffer, sized from one image's ``rows``, and its expected sizes (logged)."""
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
        stats = {
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
            f"{stats['spill_mb']:.0f} MB temporary file (projections in memory)"
            if buffer.storage == "disk"
            else f"{stats['buffer_mb']:.0f} MB buffer"
        )
        log.info(
            "memory bank: %d images x %d vectors = %d vectors x %d %s -> %s%s; "
            "bank after sampling: %d rows, %.1f MB",
            total // per_image,
            per_image,
            total,
            dim,
            stats["buffer_dtype"],
            where,
            f" (chunks of {chunk} vectors)" if chunk else "",
            bank_rows,
            stats["expected_bank_mb"],
        )
        return buffer, stats

    def _build_bank(self) -> None:
        if self._bank_buffers is None or not self._bank_buffers[0].seen:
            return
        buffers, self._bank_buffers = self._bank_buffers, None
        start = time.perf_counter()
        for model, buffer in zip(self.model.bank_models(), buffers, strict=True):
            fit_buffer = getattr(model, "fit_buffer", None)
            if fit_buffer is not None:
                fit_buffer(buffer)
            else:
                model.fit(buffer.finish())
        del buffers, buffer
        self.sample_s = time.perf_counter() - start
        if isinstance(self.model, PatchCoreEnsemble):
            # Members are z-scored on the held-out good images before the thresholds are fitted
            # on the same images (never on test data).
            loader = self.trainer.datamodule.val_dataloader()
            loader = loader[HELDOUT] if isinstance(loader, list) else loader
            self.model.fit_normalization(b["image"].to(self.device) for b in loader)

    # Lightning runs validation before on_train_epoch_end, so the bank is built by whichever comes
    # first; one epoch is all a memory bank needs.
    def on_validation_epoch_start(self) -> None:
        self._build_bank()
        super().on_validation_epoch_start()

    def on_train_epoch_end(self) -> None:
        self._build_bank()
        self.trainer.should_stop = True


def _ensemble_stats(names: list[str], stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the members' buffers, and each member's own numbers."""
    summed = ("train_vectors", "buffer_mb", "spill_mb", "expected_bank_rows", "expected_bank_mb")
    return {
        **{key: sum(s[key] for s in stats) for key in summed},
        "members": dict(zip(names, stats, strict=True)),
    }
