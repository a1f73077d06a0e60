"""Fitting a memory-bank model, top to bottom: prepare, size buffers, stream embeddings, build banks.

Plain torch (no Lightning): :class:`~defectlab.systems.MemoryBankSystem` calls
:func:`fit_memory_bank` with its data loaders, and tests call it on tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from defectlab.components.bank_buffer import EmbeddingBuffer
from defectlab.data.batch import Batch, Item
from defectlab.errors import ConfigError
from defectlab.models import PatchCore, PatchCoreEnsemble, TwoScalePatchCore
from defectlab.models.protocols import BankModel, MemoryBankModel
from defectlab.systems.reports import BankReport

log = logging.getLogger(__name__)


def embedding_rows(model: BankModel, images: torch.Tensor) -> Iterator[torch.Tensor]:
    """``(n, D)`` embedding rows of ``images``, in slices of ``model.embed_batch`` images.

    Smaller forwards bound the activation memory (~15 MB per 224 px image for PatchCore's
    1024-channel maps) and were no slower on CPU; each image's features do not depend on them.
    """
    for part in images.split(model.embed_batch or len(images)):
        emb = model.embed(part)
        yield emb.reshape(-1, emb.shape[-1])


@torch.no_grad()
def fit_memory_bank(
    model: MemoryBankModel,
    train: Sequence[Item],
    batches: Iterable[Batch],
    held_out: Iterable[Batch] | None = None,
    device: torch.device | str = "cpu",
) -> BankReport:
    """Fit ``model``'s memory bank(s) on the training images in one pass.

    1. ``model.prepare`` on evenly spaced training images (e.g. the embedding's projection).
    2. One buffer per bank, sized from one image's rows x training images; ``k`` is checked
       against the bank's expected rows, so a bad value fails before the heavy work.
    3. Every training batch's embeddings stream into the buffers.
    4. Each bank is built from its buffer (sampling, disk spill or chunks: the model's settings).
    5. Banks with per-pixel statistics fit them on the held-out good images, then ensembles
       z-score their members on the same images (never test data).

    Args:
        model: the memory-bank model (its ``bank_models()`` are fitted).
        train: the training dataset (read for steps 1 and 2).
        batches: the training batches (its loader, in file order).
        held_out: held-out good batches; required by ensembles and per-pixel statistics.
        device: where images are embedded.

    Returns:
        The buffers' sizes (results.json ``memory``) and the bank-building time.
    """
    wanted = min(model.prepare_images, len(train))
    if wanted:
        picks = torch.linspace(0, len(train) - 1, wanted).round().long().unique().tolist()
        model.prepare(torch.stack([train[i]["image"] for i in picks]).to(device))

    first = train[0]["image"].unsqueeze(0).to(device)
    banks = model.bank_models()
    buffers, stats = [], []
    for bank in banks:
        buffer, stat = _new_buffer(bank, next(embedding_rows(bank, first)), len(train))
        for key, value in bank.neighbor_settings().items():
            if value > stat["expected_bank_rows"]:
                raise ConfigError(
                    f"model.{key}={value} exceeds the memory bank's "
                    f"{stat['expected_bank_rows']} rows ({len(train)} training images, "
                    f"{stat['train_vectors']} vectors before sampling): lower model.{key}, "
                    "raise sampler.ratio or add training images"
                )
        buffers.append(buffer)
        stats.append(stat)

    for batch in batches:
        images = batch["image"].to(device)
        for bank, buffer in zip(banks, buffers, strict=True):
            for rows in embedding_rows(bank, images):
                buffer.add(rows)

    start = time.perf_counter()
    for bank, buffer in zip(banks, buffers, strict=True):
        bank.fit_buffer(buffer)
    del buffers, buffer  # the raw rows (or their temporary file) go before normalisation
    sample_s = time.perf_counter() - start

    # Per-pixel statistics belong to the model whose map they normalise: a bank, or the
    # two-scale model over its two banks.
    with_statistics = [
        m
        for m in dict.fromkeys((model, *banks))  # a one-bank model is its own bank
        if isinstance(m, (PatchCore, TwoScalePatchCore)) and m.pixel_statistics is not None
    ]
    if with_statistics and held_out is None:
        raise ConfigError("model.pixel_statistics needs held-out good images: data.val_ratio > 0")
    for bank in with_statistics:
        bank.fit_statistics(b["image"].to(device) for b in held_out)

    if isinstance(model, PatchCoreEnsemble):
        if held_out is None:
            raise ConfigError("backbone=ensemble needs held-out good images: data.val_ratio > 0")
        model.fit_normalization(b["image"].to(device) for b in held_out)
        memory = _ensemble_stats(list(model.members), stats)
    elif isinstance(model, TwoScalePatchCore):
        memory = _ensemble_stats(list(model.members), stats)
    else:
        memory = stats[0]
    return BankReport(memory=memory, sample_s=sample_s)


def _new_buffer(
    model: BankModel, rows: torch.Tensor, images: int
) -> tuple[EmbeddingBuffer, dict[str, Any]]:
    """``model``'s buffer for ``images`` training images of one image's ``rows``, and its sizes."""
    per_image = len(rows)
    total = per_image * images
    dim = rows.shape[1]
    buffer = model.embedding_buffer(total, dim, rows.device)
    bank_rows = model.bank_rows(total)
    stats = {
        "train_vectors": total,
        "dim": dim,
        "buffer_dtype": str(buffer.dtype).removeprefix("torch."),
        "storage": buffer.storage,
        "chunk_vectors": buffer.chunk,
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
        images,
        per_image,
        total,
        dim,
        stats["buffer_dtype"],
        where,
        f" (chunks of {buffer.chunk} vectors)" if buffer.chunk else "",
        bank_rows,
        stats["expected_bank_mb"],
    )
    return buffer, stats


def _ensemble_stats(names: list[str], stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the members' buffers, and each member's own numbers."""
    summed = ("train_vectors", "buffer_mb", "spill_mb", "expected_bank_rows", "expected_bank_mb")
    return {
        **{key: sum(s[key] for s in stats) for key in summed},
        "members": dict(zip(names, stats, strict=True)),
    }
