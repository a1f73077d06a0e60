"""Rewrites of a frozen network for inference: the same features, computed faster.

:class:`~defectlab.components.backbone.FeatureExtractor` applies them to a copy of its network
(never to the weights it stores) and checks the copy's features against the original's first.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame
from timm.layers.padding import get_same_padding
from torch import nn


def fold_conv_batchnorm(net: nn.Module) -> int:
    """Fold each eval-mode BatchNorm into the convolution registered just before it, in place.

    ``bn(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(var + eps)`` and
    ``b' = (b - mean) * g / sqrt(var + eps) + beta``; timm's ``BatchNormAct2d`` keeps its dropout
    and activation. Pairs are found by registration order, which is not proof that the norm
    normalises that convolution: :meth:`FeatureExtractor.forward` checks the folded copy's features
    against the original's before using it. Returns the number of folded pairs.
    """
    folded = 0
    for parent in list(net.modules()):
        children = list(parent.named_children())
        for (_, conv), (norm_name, norm) in pairwise(children):
            if not (
                isinstance(conv, nn.Conv2d)
                and type(norm) in (nn.BatchNorm2d, BatchNormAct2d)
                and not norm.training
                and norm.running_mean is not None
                and norm.num_features == conv.out_channels
            ):
                continue
            # float64, so that folding adds no rounding of its own.
            scale = norm.running_var.double().add(norm.eps).rsqrt()
            if norm.weight is not None:
                scale = scale * norm.weight.double()
            shift = -norm.running_mean.double() * scale
            if norm.bias is not None:
                shift = shift + norm.bias.double()
            if conv.bias is not None:
                shift = shift + conv.bias.double() * scale
            # Elementwise products keep the weight's layout (channels-last on CPU).
            weight = conv.weight.double() * scale.view(-1, *[1] * (conv.weight.dim() - 1))
            conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)
            # timm's BatchNormAct2d keeps what follows its normalisation.
            bn_act = type(norm) is BatchNormAct2d
            setattr(
                parent, norm_name, nn.Sequential(norm.drop, norm.act) if bn_act else nn.Identity()
            )
            folded += 1
    return folded


class SamePaddingConv2d(nn.Conv2d):
    """timm's TensorFlow-"same" convolution (``Conv2dSame``) without a padded copy of its input.

    TF's "same" padding puts the odd zero after the input (a 3 x 3, stride-2 convolution of an
    even size pads 0 before and 1 after), which ``nn.Conv2d``'s symmetric padding cannot express,
    so timm pads a copy of every input (``F.pad``: 1.7-1.9 ms per 224 px image for lite0's
    96 x 113 x 113 one at batch 1 on 2 CPU cores). For an odd total, with one zero tap put
    before the kernel, ``w' = [0, w]``, and symmetric padding ``p_after = p_before + 1``, output
    ``i`` reads ``x[s i + t - 1 - p_before]`` with ``w[t - 1]`` for ``t = 1..k``: TF's inputs and
    weights (the extra leading zero row meets the zero tap). Frozen weights only: the widened
    kernels are made once per input-size parity and kept.
    """

    def __init__(self, conv: Conv2dSame) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        if conv.dilation != (1, 1):
            raise ValueError(
                "SamePaddingConv2d: a zero tap widens a dilated kernel by its dilation"
            )
        self.weight = conv.weight
        self.bias = conv.bias
        # (extra rows, extra columns) -> kernel; a dict, not buffers: nothing of it is stored.
        self._kernels: dict[tuple[int, int], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = [
            get_same_padding(int(size), k, s, 1)
            for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True)
        ]
        extra = (pad[0] % 2, pad[1] % 2)  # an odd total: one more zero after than before
        kernel = self._kernels.get(extra)
        if kernel is None:
            # A normal tensor even on a first call under inference mode: a later call may record
            # gradients for its input, which saves the kernel.
            with torch.inference_mode(False), torch.no_grad():
                kernel = F.pad(self.weight, (extra[1], 0, extra[0], 0))
            self._kernels[extra] = kernel
        padding = (pad[0] - pad[0] // 2, pad[1] - pad[1] // 2)
        return F.conv2d(x, kernel, self.bias, self.stride, padding, 1, self.groups)


def absorb_same_padding(net: nn.Module) -> int:
    """Replace each undilated timm ``Conv2dSame`` in ``net`` by :class:`SamePaddingConv2d`, in place.

    Returns the number replaced (lite0: 4 up to ``blocks.4``, 5 in all).
    """
    replaced = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Conv2dSame and child.dilation == (1, 1):
                setattr(parent, name, SamePaddingConv2d(child))
                replaced += 1
    return replaced
