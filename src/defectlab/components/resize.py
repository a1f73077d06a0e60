"""torchvision's antialiased bilinear resize of ``uint8`` images, as plain integer arithmetic.

torch resizes ``uint8`` CPU images with fixed-point (int16) weights and rounds to ``uint8`` after
each axis. Other runtimes (ONNX Runtime's Resize) round differently, which moved PatchCore scores
by ~2e-3 relative on ELPV (300 -> 224 px), far beyond a 1e-4 parity target. Written out as
gathers, integer multiplies and shifts with the same weights, any runtime reproduces torch bit for
bit; the price is a fixed input size (the weights are computed for it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# torch keeps fixed-point weights below 2**15 (int16) and uses at most 22 fractional bits.
_WEIGHT_LIMIT, _MAX_PRECISION = 1 << 15, 22


def antialias_weights(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` float64 weights of torch's antialiased bilinear resize along one axis."""
    # Resizing one-hot rows in float64 reads the weights straight out of torch's own kernel.
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, 1, n_in)
    out = F.interpolate(eye, size=(1, n_out), mode="bilinear", antialias=True, align_corners=False)
    return out.view(n_in, n_out).T.contiguous()


def fixed_point(weights: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer weights and their precision (fractional bits), as torch's uint8 kernel derives them."""
    w_max = float(weights.max())
    precision = 0
    while precision < _MAX_PRECISION:
        if int(0.5 + w_max * (1 << (precision + 1))) >= _WEIGHT_LIMIT:
            break
        precision += 1
    scaled = weights * (1 << precision)
    return torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc().to(torch.int32), precision


class _AxisPass(nn.Module):
    """One axis of the resize: ``out[j] = (sum_k w[j, k] * x[idx[j, k]] + half) >> precision``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        weights, self.precision = fixed_point(antialias_weights(n_in, n_out))
        taps = int((weights != 0).sum(1).max())
        first = (weights != 0).int().argmax(1)
        index = (first[:, None] + torch.arange(taps)).clamp_max(n_in - 1)  # (n_out, taps)
        tap_weights = weights.gather(1, index)
        # Clamped duplicate taps at the border must not count twice.
        tap_weights[(first[:, None] + torch.arange(taps)) > n_in - 1] = 0
        self.register_buffer("index", index.T.contiguous(), persistent=False)  # (taps, n_out)
        self.register_buffer("weights", tap_weights.T.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Resize the last axis of int32 ``x``."""
        acc = None
        # A loop over the few taps keeps memory at one output-sized tensor (a gather of all taps
        # at once would hold taps x that).
        for k in range(self.index.shape[0]):
            term = x.index_select(-1, self.index[k]) * self.weights[k]
            acc = term if acc is None else acc + term
        half = (1 << self.precision) >> 1
        rounded = torch.div(acc + half, 1 << self.precision, rounding_mode="floor")
        return rounded.clamp(0, 255)


class ExactResize(nn.Module):
    """``uint8`` ``(B, C, H, W)`` of one fixed size -> ``uint8`` ``(B, C, *out_size)``.

    Bit-identical to ``torchvision.transforms.v2.Resize(out_size, antialias=True)`` on CPU uint8
    images: width first, then height, rounding to uint8 in between, as torch does.
    """

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> None:
        super().__init__()
        self.in_size, self.out_size = tuple(in_size), tuple(out_size)
        self.width = _AxisPass(in_size[1], out_size[1]) if in_size[1] != out_size[1] else None
        self.height = _AxisPass(in_size[0], out_size[0]) if in_size[0] != out_size[0] else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.int32)
        if self.width is not None:
            x = self.width(x)
        if self.height is not None:
            x = self.height(x.transpose(-1, -2)).transpose(-1, -2)
        return x.to(torch.uint8)
