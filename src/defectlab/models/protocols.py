"""Typed contracts between models and the code that fits, saves, loads and runs them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from defectlab.components.bank_buffer import EmbeddingBuffer
from defectlab.components.knn import NearestNeighbors
from defectlab.models.output import AnomalyOutput


@runtime_checkable
class AnomalyModel(Protocol):
    """Every model: scores images ``(B, 3, H, W)`` in [0, 1] whose sides are multiples of
    ``input_multiple`` (its deepest layer's downsampling)."""

    input_multiple: int

    def predict(self, images: torch.Tensor) -> AnomalyOutput: ...


@runtime_checkable
class BankModel(Protocol):
    """One memory bank built from streamed training embeddings (PatchCore, feature-kNN).

    ``embed`` maps images to rows ``(..., D)`` in passes of ``embed_batch`` images (None = the whole
    batch); the rows stream into ``embedding_buffer``, from which ``fit_buffer`` builds the bank
    ``memory_bank`` ``(bank_rows(N), D)``, searched by ``knn``; ``k`` nearest bank rows enter the
    image score.
    """

    k: int
    embed_batch: int | None
    memory_bank: torch.Tensor
    knn: NearestNeighbors

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...

    def embedding_buffer(
        self, total: int, dim: int, device: torch.device | str = "cpu"
    ) -> EmbeddingBuffer: ...

    def fit_buffer(self, buffer: EmbeddingBuffer) -> None: ...

    def bank_rows(self, vectors: int) -> int: ...

    def neighbor_settings(self) -> dict[str, int]:
        """``model.<key>: count`` of every search setting that needs ``count`` bank rows."""
        ...


@runtime_checkable
class MemoryBankModel(AnomalyModel, Protocol):
    """Fitted in one pass over good images (PatchCore, its ensembles, feature-kNN).

    ``bank_models()`` lists the :class:`BankModel` s whose banks are built from streamed
    embeddings (the model itself, or one per ensemble member); ``prepare(images)`` fits what must
    exist before that (e.g. an embedding projection) from ``prepare_images`` training images
    (0 = nothing). ``embed_batch``: images per backbone forward, in fitting and inside
    ``predict`` (None = the whole batch; ``predict`` takes any batch and slices its forwards);
    ``localizes``: False for image-level models (flat maps: no pixel metrics).
    """

    prepare_images: int
    embed_batch: int | None
    localizes: bool

    def bank_models(self) -> list[BankModel]: ...

    def prepare(self, images: torch.Tensor) -> None: ...


def memory_banks(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every memory bank of ``model``, in ``bank_models()`` order; none for trained models."""
    banks = model.bank_models() if isinstance(model, MemoryBankModel) else []
    return [bank.memory_bank for bank in banks]


@runtime_checkable
class PatchEmbeddingModel(AnomalyModel, Protocol):
    """Scores from patch features it can hand out too (PatchCore): ``(output, (B, h, w, D))``."""

    embed_batch: int | None

    def predict_embedded(self, images: torch.Tensor) -> tuple[AnomalyOutput, torch.Tensor]: ...


@runtime_checkable
class TrainedModel(AnomalyModel, Protocol):
    """Trained by gradient descent on a loss (CAE, U-Net); ``supervised`` ones also take masks.

    ``synthesizes_defects``: the model draws synthetic defects of its own inside ``loss`` (the
    U-Net's feature noise; ``loss(images, masks, generator=...)`` for fixed held-out draws), so a
    supervised model needs no pasted ones. ``fit_statistics(good_images)``: refit statistics the
    map is normalised with (the CAE's per-pixel z-scores) from an iterable of good training
    batches; models without such statistics return without reading it.
    """

    supervised: bool
    synthesizes_defects: bool

    def loss(self, images: torch.Tensor, *args, **kwargs) -> torch.Tensor: ...

    def fit_statistics(self, good_images: Iterable[torch.Tensor]) -> None: ...


@runtime_checkable
class ResizableBuffers(Protocol):
    """A module whose named persistent buffers take the leading size stored in a model file.

    A memory bank's row count is only known after fitting, so a freshly built model holds an empty
    bank ``(0, D)``; loading gives it the saved ``(N, D)``. The loader allows a different first
    dimension only for the buffers listed here (every other size must match exactly), and the
    module resizes them in ``_load_from_state_dict``.
    """

    resizable_buffers: tuple[str, ...]


@runtime_checkable
class DerivedBuffers(Protocol):
    """A module whose named persistent buffers are computed from its other state.

    They are stored so that loading costs no work, but a model file written before such a buffer
    existed lacks it: the loader accepts that, and the module computes the buffer in
    ``_load_from_state_dict`` (e.g. PatchCore's ``bank_neighbors`` from its memory bank).
    """

    derived_buffers: tuple[str, ...]
