"""Per-pixel statistics of good images' anomaly maps, to turn raw maps into per-position z-scores.

On aligned products (solar cells, PCBs, bottles seen from above) some positions are hard for
every good image too: a reconstruction model errs at the cut corners and busbars of every cell.
Dividing each position's error by its spread over good images (after subtracting its mean) makes
an anomaly a deviation from what is usual *at that place*. On unaligned textures the statistics
are nearly flat, and the map is only shifted and scaled.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from defectlab.errors import ConfigError


class PixelStatistics(nn.Module):
    """Running per-pixel mean and standard deviation of maps ``(B, 1, H, W)``; z-scores maps.

    Fitted by :meth:`fit` (or :meth:`reset`, :meth:`update` over good images, :meth:`finish`). ``mean`` and
    ``std`` are stored flat ``(H * W,)`` beside ``size = (H, W)``: the map size is only known from
    the data, and a flat buffer is one the model file may resize on load (``ResizableBuffers``:
    leading dimension only), so a model file restores them.

    Args:
        eps: added to the per-pixel std as a share of its mean over the map, so that positions
            that never vary (image borders) do not blow up the z-score.
    """

    resizable_buffers: tuple[str, ...] = ("mean", "std")  # models.protocols.ResizableBuffers

    def __init__(self, eps: float = 0.1) -> None:
        super().__init__()
        if eps <= 0:
            raise ConfigError(f"model.pixel_statistics.eps must be > 0, got {eps}")
        self.eps = eps
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.zeros(0))
        self.register_buffer("size", torch.zeros(2, dtype=torch.long))
        self._sums: list[torch.Tensor] | None = None
        self._count = 0

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    def reset(self) -> None:
        self._sums, self._count = None, 0

    def update(self, maps: torch.Tensor) -> None:
        """Add good images' maps ``(B, 1, H, W)`` (float64 sums: stable over thousands)."""
        maps = maps.detach().double()
        sums = [maps.sum(0, keepdim=True), maps.pow(2).sum(0, keepdim=True)]
        self._sums = (
            sums if self._sums is None else [a + b for a, b in zip(self._sums, sums, strict=True)]
        )
        self._count += len(maps)

    def finish(self) -> None:
        """Set mean and std from the maps added since :meth:`reset`."""
        if self._sums is None or self._count < 2:
            raise ConfigError("per-pixel map statistics need at least 2 good training images")
        total, squares = self._sums
        mean = total / self._count
        var = (squares / self._count - mean.pow(2)).clamp(min=0) * self._count / (self._count - 1)
        self.mean = mean.float().flatten().clone()
        self.std = var.sqrt().float().flatten().clone()
        self.size = torch.tensor(mean.shape[-2:], dtype=torch.long, device=self.size.device)
        self.reset()

    def fit(self, maps: Iterable[torch.Tensor]) -> None:
        """Refit on good images' maps, an iterable of ``(B, 1, H, W)`` batches."""
        self.reset()
        for batch in maps:
            self.update(batch)
        self.finish()

    def z_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """Z-scores of maps ``(B, 1, H, W)``, refused until fitted: for models whose map must not
        pass raw once statistics are configured (PatchCore's banks are fitted before them)."""
        if not self.fitted:
            raise RuntimeError(
                "the per-pixel statistics are not fitted: fit_statistics on held-out good images "
                "first"
            )
        return self(maps)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Z-scores of maps ``(B, 1, H, W)``; maps pass unchanged until fitted."""
        if not self.fitted:
            return maps
        size = tuple(int(v) for v in self.size)
        if size != tuple(maps.shape[-2:]):
            raise ConfigError(
                f"per-pixel map statistics are {size} but the map is "
                f"{tuple(maps.shape[-2:])}: evaluate at the data.image_size the model was trained at"
            )
        mean, std = self.mean.view(1, 1, *size), self.std.view(1, 1, *size)
        return (maps - mean) / (std + self.eps * std.mean())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for name in ("mean", "std"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
