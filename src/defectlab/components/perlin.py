"""Perlin noise and the irregular region masks DRAEM draws from it (Zavrtanik et al., ICCV 2021).

Hand-written (about 30 lines of torch): no maintained library offers seeded, batched 2-D Perlin
noise on torch tensors (``noise``/``perlin-noise`` on PyPI are per-pixel Python loops, unmaintained,
and use their own random state). DRAEM's reference ``rand_perlin_2d`` needs the image side to be a
multiple of the lattice; this version samples the lattice at continuous coordinates, so any size
works. All randomness comes from a CPU ``torch.Generator``: a seed gives the same masks anywhere.
"""

from __future__ import annotations

import math

import torch


def _fade(t: torch.Tensor) -> torch.Tensor:
    # Perlin's quintic fade 6t^5 - 15t^4 + 10t^3: zero first and second derivative at lattice points.
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    height: int, width: int, cells: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """Gradient noise ``(height, width)`` in about ``[-1, 1]`` with ``cells`` lattice cells (y, x).

    Larger ``cells`` give finer structure; unequal cells give elongated, anisotropic blobs.
    """
    cy, cx = cells
    angles = 2 * math.pi * torch.rand(cy + 1, cx + 1, generator=generator)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (cy+1, cx+1, 2)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * cy / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * cx / width
    y0, x0 = ys.floor().long().clamp(max=cy - 1), xs.floor().long().clamp(max=cx - 1)
    fy, fx = (ys - y0).view(-1, 1), (xs - x0).view(1, -1)

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[(y0 + dy).view(-1, 1), (x0 + dx).view(1, -1)]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return math.sqrt(2) * torch.lerp(top, bottom, ty)


def perlin_mask(
    height: int,
    width: int,
    area: float,
    generator: torch.Generator,
    min_cells: int = 1,
    max_cells: int = 64,
) -> torch.Tensor:
    """Binary ``(1, height, width)`` mask of irregular Perlin regions covering ``area`` of the image.

    As in DRAEM, the lattice has ``2**a x 2**b`` cells with ``a``, ``b`` drawn independently
    (powers of two from ``min_cells`` to ``max_cells``), so regions range from large round blobs to
    thin streaks. Instead of DRAEM's fixed threshold (0.5, which leaves the area to chance and can
    draw nothing) the noise is cut at its ``1 - area`` quantile: the drawn area is kept exactly.
    """
    lo, hi = int(math.log2(min_cells)), int(math.log2(max_cells))
    cells = tuple(2 ** int(torch.randint(lo, hi + 1, (), generator=generator)) for _ in range(2))
    noise = perlin_noise(height, width, cells, generator)  # type: ignore[arg-type]
    threshold = torch.quantile(noise.flatten(), 1 - area)
    return (noise >= threshold).float().unsqueeze(0)
