"""PatchCore's locally aware patch features (Roth et al., Sec. 3.1): how backbone maps become patch vectors.

Two layouts, chosen with ``embedding=`` (conf/embedding/):

- :class:`PatchEmbedder` (``paper``): the reference code's projection to fixed dimensions
  (1024 / 1024), designed for WideResNet-50's 512 + 1024 channels.
- :class:`NativeEmbedder` (``native``): each layer average-pooled over ``p x p``, deeper maps
  resized to the first grid, concatenated at the backbone's own channel counts (152 for lite0's
  ``blocks.2`` + ``blocks.4``), optionally projected to ``dim`` principal components fitted on
  training features.

Both map layer features ``[(B, C_l, h_l, w_l)]`` to ``(B, D, h_0, w_0)`` (channels-last memory) and
expose ``out_dim``.
"""

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from defectlab.errors import ConfigError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@runtime_checkable
class Embedder(Protocol):
    """What PatchCore needs from a patch-feature layout."""

    out_dim: int

    def __call__(self, features: Sequence[torch.Tensor]) -> torch.Tensor: ...


def check_patch_size(patch_size: int, key: str = "embedding.patch_size") -> None:
    """ConfigError naming ``key`` unless the pooling neighbourhood is odd and >= 1."""
    if patch_size < 1 or patch_size % 2 == 0:
        raise ConfigError(f"{key} must be odd and >= 1, got {patch_size}")


def _check_common(patch_size: int, batch_chunk: int | None) -> None:
    check_patch_size(patch_size)
    if batch_chunk is not None and batch_chunk < 1:
        raise ConfigError(f"model.embed_chunk must be >= 1 or null, got {batch_chunk}")


def _in_chunks(embed, features: Sequence[torch.Tensor], step: int | None) -> torch.Tensor:
    """``embed(features)`` over passes of ``step`` images (identical output for any step)."""
    # Exported graphs keep the batch size symbolic: neither a test of it nor a loop over it
    # would trace, so they are checked first.
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return embed(features)
    batch = features[0].shape[0]
    if step is None or batch <= step:
        return embed(features)
    parts = [embed([f[i : i + step] for f in features]) for i in range(0, batch, step)]
    return torch.cat(parts)  # channels-last in, channels-last out


def adaptive_pool_matrix(in_dim: int, out_dim: int) -> torch.Tensor:
    """``(out_dim, in_dim)`` matrix equal to ``adaptive_avg_pool1d`` from ``in_dim`` to ``out_dim``."""
    eye = torch.eye(in_dim, dtype=torch.float64).unsqueeze(1)  # (in, 1, in)
    return F.adaptive_avg_pool1d(eye, out_dim).squeeze(1).T.contiguous()  # (out, in)


class PatchEmbedder(nn.Module):
    """Aggregate each layer over a ``p x p`` neighbourhood and project to a fixed dimension.

    The reference code (Roth et al.) unfolds every layer into ``p x p`` patches (zero padding),
    bilinearly resizes deeper grids to the first layer's grid, average-pools each layer's flattened
    ``C_l * p * p`` patch vector to ``pretrain_embed_dim`` and the concatenation of layers to
    ``target_embed_dim``. All of these steps are linear and the resize acts per channel, so the
    whole pipeline equals one fixed convolution per layer followed by the resize and a sum. That
    is exact (tested against the literal version).

    Each output dimension of that map averages only a few adjacent entries of the layers'
    ``C_l * p * p`` patch vectors (with the paper's settings, each layer feeds its own block of the
    D outputs), so it is applied as a few weighted gathers of the unfolded layers, not as a dense
    convolution: at 224 px with efficientnet_lite0 the dense form was ~1 GFLOP per image, more
    than the backbone, while the gathers touch each output once per tap.

    Args:
        channels: channels of each input layer, shallowest first.
        pretrain_embed_dim: per-layer pooled dimension (paper code: 1024).
        target_embed_dim: final patch-feature dimension D (paper code: 1024).
        patch_size: neighbourhood size p (paper: 3).
        batch_chunk: images embedded per pass (None = the whole batch). Each image's gathers
            leave ~10 MB of temporaries at lite0/224 px; in passes of 2 they stay in the CPU
            caches (measured on ELPV: 7.2-8.2 ms per image with 32 images in one pass, 2.4-3.5
            in passes of 2).
            The output is identical for any value.
    """

    def __init__(
        self,
        channels: Sequence[int],
        pretrain_embed_dim: int = 1024,
        target_embed_dim: int = 1024,
        patch_size: int = 3,
        batch_chunk: int | None = None,
    ) -> None:
        super().__init__()
        _check_common(patch_size, batch_chunk)
        self.patch_size = patch_size
        self.batch_chunk = batch_chunk
        self.out_dim = target_embed_dim
        n = len(channels)
        final = adaptive_pool_matrix(n * pretrain_embed_dim, target_embed_dim)  # (D, n * P)
        row_sets = []
        for i, c in enumerate(channels):
            per_layer = adaptive_pool_matrix(c * patch_size**2, pretrain_embed_dim)  # (P, C*p*p)
            block = (
                final[:, i * pretrain_embed_dim : (i + 1) * pretrain_embed_dim] @ per_layer
            ).float()
            rows, taps, weights = _sparse_rows(block)
            # Buffers, not parameters: fixed by the method, recomputed from config, not checkpointed.
            self.register_buffer(f"rows{i}", rows, persistent=False)
            self.register_buffer(f"taps{i}", taps, persistent=False)
            self.register_buffer(f"weights{i}", weights, persistent=False)
            row_sets.append(rows)
        self.num_layers = n
        # Paper settings give each layer its own contiguous run of outputs: concatenating the
        # layers' outputs is then the sum, without a zero-filled (B, D, h, w) tensor per layer.
        self.concatenate = torch.equal(torch.cat(row_sets), torch.arange(target_embed_dim))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Map layer features ``[(B, C_l, h_l, w_l)]`` to patch embeddings ``(B, D, h_0, w_0)``."""
        return _in_chunks(self._embed, features, self.batch_chunk)

    def _embed(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        parts = []
        for i, feat in enumerate(features):
            taps = getattr(self, f"taps{i}")
            weights = getattr(self, f"weights{i}").to(feat.dtype)
            unfolded = _unfold(feat, self.patch_size)
            emb = None
            for t in range(taps.shape[1]):  # a handful of taps: no (B, R, taps, L) temporary
                term = unfolded.index_select(1, taps[:, t]) * weights[:, t, None]
                emb = term if emb is None else emb + term
            # Channels-last: torch's CPU bilinear resize is ~8x faster in it, and the (B, h, w, D)
            # rows that the nearest-neighbour search reads then need no copy.
            emb = emb.unflatten(2, feat.shape[-2:]).contiguous(memory_format=torch.channels_last)
            if emb.shape[-2:] != size:
                emb = F.interpolate(emb, size=size, mode="bilinear", align_corners=False)
            parts.append(emb)
        if self.concatenate:
            return torch.cat(parts, dim=1)
        out = parts[0].new_zeros(parts[0].shape[0], self.out_dim, *size)
        for i, emb in enumerate(parts):
            out = out.index_add(1, getattr(self, f"rows{i}"), emb)
        return out


class NativeEmbedder(nn.Module):
    """Per-layer ``p x p`` average pooling, resize to the first grid, concatenation (``embedding=native``).

    The layout anomalib and most re-implementations use: every channel keeps its own value, so
    the patch vector has ``sum(C_l)`` dimensions (152 for lite0 ``blocks.2`` + ``blocks.4``)
    instead of the paper code's 1024. On the same ELPV split with lite0 it scored image AUROC
    0.9588 / 0.9163 (mono / poly) against 0.9567 / 0.8721 for the paper projection, and each
    nearest-neighbour search is ~7x narrower (issue 18's table; docs/methods/patchcore.md).

    Args:
        channels: channels of each input layer, shallowest first.
        patch_size: neighbourhood p of the average pooling (zero padding counted, as the paper
            code's unfold does).
        interpolation: how deeper maps are resized to the first layer's grid
            (``bilinear`` | ``bicubic`` | ``nearest``).
        dim: null = keep the native channels; d = project onto the top d principal components
            of training patch features (:meth:`fit`; for wide backbones, e.g. 1536 channels of
            wide_resnet50_2, where the search cost grows with the dimension).
        fit_images: training images (evenly spaced over the training set) the projection is
            fitted on (``dim`` only).
        batch_chunk: images embedded per pass (speed only; None = the whole batch).
        grid_layer: index into the layers (shallowest first) whose grid the patches take; finer
            layers are average-pooled onto it, deeper ones resized. 0 = the finest layer's grid;
            1 with ``[blocks.1, blocks.2, blocks.4]`` adds stride-4 detail at ``blocks.2``'s patch
            count (a stride-4 grid has four times the patches to store and search).
        layers: indices into the backbone's layers (shallowest first) this layout uses; None =
            all of them. ``grid_layer`` then indexes the used layers. The two-scale PatchCore
            (``model.scales=two``) gives its fine bank ``[0]``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        patch_size: int = 3,
        interpolation: str = "bilinear",
        dim: int | None = None,
        fit_images: int = 16,
        batch_chunk: int | None = None,
        grid_layer: int = 0,
        layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_common(patch_size, batch_chunk)
        used = tuple(range(len(channels))) if layers is None else tuple(layers)
        if not used or len(set(used)) != len(used) or not all(0 <= i < len(channels) for i in used):
            raise ConfigError(
                f"embedding layers {list(used)}: distinct indices into the {len(channels)} "
                "backbone.layers (0 = the finest)"
            )
        channels = [channels[i] for i in used]
        if not 0 <= grid_layer < len(channels):
            raise ConfigError(
                f"embedding.grid_layer={grid_layer}: an index into the {len(channels)} "
                "backbone.layers (0 = the finest)"
            )
        if fit_images < 1:
            raise ConfigError(f"embedding.fit_images must be >= 1, got {fit_images}")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"embedding.interpolation={interpolation}: choose one of {INTERPOLATIONS}"
            )
        native = int(sum(channels))
        if dim is not None and not 1 <= dim < native:
            raise ConfigError(
                f"embedding.dim={dim} must be between 1 and the native dimension {native} "
                "(sum of the layers' channels), or null to keep it"
            )
        self.patch_size = patch_size
        self.interpolation = interpolation
        self.batch_chunk = batch_chunk
        self.grid_layer = grid_layer
        self.layers = used
        self.native_dim = native
        self.out_dim = dim or native
        self.reduced = dim is not None
        self.fit_images = fit_images if self.reduced else 0
        # The fitted projection is part of the model: persistent, saved with the bank.
        if self.reduced:
            self.register_buffer("mean", torch.zeros(native))
            self.register_buffer("components", torch.zeros(native, dim))
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def needs_fit(self) -> bool:
        """True while a ``dim`` projection waits for :meth:`fit`."""
        return self.reduced and not bool(self.fitted)

    @torch.no_grad()
    def fit(self, features: Sequence[torch.Tensor]) -> None:
        """Fit the ``dim`` projection on training layer features (PCA of their patch vectors)."""
        if not self.reduced:
            return
        rows = self._native(features).permute(0, 2, 3, 1).reshape(-1, self.native_dim)
        rows = rows.double()
        mean = rows.mean(0)
        # Covariance eigenvectors (torch.linalg.eigh, ascending): exact PCA, D x D only.
        cov = (rows - mean).T @ (rows - mean) / max(len(rows) - 1, 1)
        _, vectors = torch.linalg.eigh(cov)
        components = vectors[:, -self.out_dim :].flip(1)  # largest variance first
        # Sign convention (largest entry positive), so a refit gives the same projection.
        flip = components.gather(0, components.abs().argmax(0, keepdim=True)).sign()
        self.mean.copy_(mean.float())
        self.components.copy_((components * flip).float())
        self.fitted.fill_(True)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Map layer features ``[(B, C_l, h_l, w_l)]`` to patch embeddings on the ``grid_layer``'s grid."""
        return _in_chunks(self._embed, features, self.batch_chunk)

    def _native(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        features = [features[i] for i in self.layers]
        size = features[self.grid_layer].shape[-2:]
        parts = []
        p = self.patch_size
        for feat in features:
            # Channels-last: torch's CPU resize is ~8x faster in it, and the (B, h, w, D) rows
            # that the nearest-neighbour search reads then need no copy.
            feat = feat.contiguous(memory_format=torch.channels_last)
            if p > 1:
                feat = F.avg_pool2d(feat, p, stride=1, padding=p // 2, count_include_pad=True)
            if feat.shape[-2] > size[0]:  # a finer layer: mean over each grid cell
                feat = F.adaptive_avg_pool2d(feat, size)
            elif feat.shape[-2:] != size:
                feat = F.interpolate(
                    feat,
                    size=size,
                    mode=self.interpolation,
                    **({} if self.interpolation == "nearest" else {"align_corners": False}),
                )
            parts.append(feat)
        return torch.cat(parts, dim=1)

    def _embed(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self._native(features)
        if not self.reduced:
            return out
        if self.needs_fit:
            raise RuntimeError("embedding.dim is set but the projection was not fitted")
        rows = out.permute(0, 2, 3, 1)  # (B, h, w, C): a view of channels-last memory
        reduced = (rows - self.mean) @ self.components
        return reduced.permute(0, 3, 1, 2)  # (B, d, h, w), channels-last memory


def _unfold(feat: torch.Tensor, size: int) -> torch.Tensor:
    """``F.unfold(feat, size, padding=size // 2)``, ``(B, C * size**2, h * w)``, bit for bit.

    Stacking the ``size**2`` shifted views of the zero-padded map is 1.3-3.5x faster than torch's
    CPU ``im2col`` at lite0's layer shapes (measured: 0.19 vs 0.09 ms for its 40 x 28 x 28 layer).
    """
    b, c, h, w = feat.shape
    pad = size // 2
    padded = F.pad(feat, (pad, pad, pad, pad))
    shifts = [padded[:, :, y : y + h, x : x + w] for y in range(size) for x in range(size)]
    return torch.stack(shifts, dim=2).reshape(b, c * size * size, h * w)


def _sparse_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero rows of ``matrix`` as gathers: row ids ``(R,)``, column ids and weights ``(R, T)``.

    Rows with fewer than T entries are padded with weight 0 on column 0.
    """
    nonzero = matrix != 0
    rows = nonzero.any(dim=1).nonzero().flatten()
    counts = nonzero[rows].sum(dim=1)
    width = max(int(counts.max()), 1) if len(rows) else 1
    taps = torch.zeros(len(rows), width, dtype=torch.long)
    weights = torch.zeros(len(rows), width, dtype=matrix.dtype)
    for r, row in enumerate(rows.tolist()):
        cols = nonzero[row].nonzero().flatten()
        taps[r, : len(cols)] = cols
        weights[r, : len(cols)] = matrix[row, cols]
    return rows, taps, weights
