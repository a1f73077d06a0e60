"""Rounding-error bounds of the exact search's matrix products (Higham's notation).

``u``: unit roundoff of a format; ``gamma_n = n u32 / (1 - n u32)`` bounds the relative error of
any float32 sum of n terms, in any order (FMA included). The bounds hold for every row of a block
when given the block's largest row norm: they grow with it.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0**-24  # float32 unit roundoff
# Input unit roundoff, and the absolute error of an element below the normal range (flushed
# to zero by the bfloat16 dot-product instructions; float16 subnormal spacing 2^-24, halved).
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: U32}
TINY = {torch.bfloat16: 2.0**-126, torch.float16: 2.0**-25, torch.float32: 2.0**-126}


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): relative error of any float32 sum of n terms."""
    return n * U32 / (1 - n * U32)


def low_precision_bound(
    x_norm: torch.Tensor, w_norm: torch.Tensor, dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """Bound ``E(x, w)`` on ``|y_hat - (-||x - w||^2 / 2)|`` for the low-precision product.

    With x = sigma (q - c), w = sigma (b - c) (centre c, power-of-two scale sigma, both exact),
    x_hat = lp(x), w_hat = lp(w) with |x_hat_i - x_i| <= u~|x_i| + eta (u~ = u + 2 u32 covers
    the float32 centring of q and a double rounding float64 -> float32 -> lp of w), and the bias
    columns h + l = lp-split of -||.||^2 / 2 (error <= 2 u~^2 ||.||^2 / 2, plus gamma_{D+2} for
    the query's float32 sum of squares and centring):

        |x_hat . w_hat - x . w| <= (2u~ + u~^2) ||x|| ||w|| + eta (1 + u~) sqrt(D) (||x|| + ||w||)
                                   + D eta^2                           (Cauchy-Schwarz)
        float32 accumulation of D + 4 exact products <= gamma_{D+4} T,
        T = ((1 + u~)||x|| + eta sqrt(D)) ((1 + u~)||w|| + eta sqrt(D))
            + (1 + 2u~) (||x||^2 + ||w||^2) / 2                        (any summation order)
        flushed products: (D + 4) 2^-126.

    Output rounding (bfloat16 on CPU) is handled by the caller: |v - y_hat| <= u/(1-u) |y_hat|.
    Arguments are float64 norms that broadcast; monotone in both, so a block's largest ``w_norm``
    bounds all its rows.
    """
    u = UNIT[dtype] + 2 * U32
    eta = TINY[dtype]
    root = math.sqrt(dim)
    g2, g4 = gamma(dim + 2), gamma(dim + 4)
    # product + bias + g4 total + flushed, expanded into a x w + b (x + w) + c (x^2 + w^2) + d
    # (all terms >= 0): a dozen tensor operations instead of thirty, for every search call.
    a = (2 * u + u * u) + g4 * (1 + u) ** 2
    b = eta * (1 + u) * root * (1 + g4)
    c = ((2 * u * u + g2) + g4 * (1 + 2 * u)) / 2
    d = dim * eta * eta * (1 + g4) + (dim + 4) * 2.0**-126
    x_part = x_norm * (b + c * x_norm)
    w_part = w_norm * (b + c * w_norm) + d
    return (x_norm * w_norm) * a + x_part + w_part


def fp32_bound(q_norm: torch.Tensor, b_norm: torch.Tensor, dim: int) -> torch.Tensor:
    """Bound on ``|y_hat - (q . b - ||b||^2 / 2)|`` for ``addmm(-||b||^2/2, b, q)`` in float32.

    The inputs are exact; the bias is float64 rounded once (u32 ||b||^2 / 2); the product and the
    bias add are a float32 sum of D + 1 terms: gamma_{D+1} (||q|| ||b|| + ||b||^2 / 2) (Cauchy-
    Schwarz), plus flushed subnormal products (D + 1) 2^-126.
    """
    half = b_norm.square() / 2
    return (
        gamma(dim + 2) * (q_norm * b_norm + half) * (1 + U32) + U32 * half + (dim + 1) * 2.0**-126
    )
