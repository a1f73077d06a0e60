"""PatchCore's locally aware patch features (Roth et al., Sec. 3.1), computed as convolutions."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
    is exact (tested against the literal version) and avoids materialising the unfolded tensor,
    which is ``p * p`` times the feature map.

    Args:
        channels: channels of each input layer, shallowest first.
        pretrain_embed_dim: per-layer pooled dimension (paper code: 1024).
        target_embed_dim: final patch-feature dimension D (paper code: 1024).
        patch_size: neighbourhood size p (paper: 3).
    """

    def __init__(
        self,
        channels: Sequence[int],
        pretrain_embed_dim: int = 1024,
        target_embed_dim: int = 1024,
        patch_size: int = 3,
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"model.patch_size must be odd and >= 1, got {patch_size}")
        self.patch_size = patch_size
        self.out_dim = target_embed_dim
        n = len(channels)
        final = adaptive_pool_matrix(n * pretrain_embed_dim, target_embed_dim)  # (D, n * P)
        kernels = []
        for i, c in enumerate(channels):
            per_layer = adaptive_pool_matrix(c * patch_size**2, pretrain_embed_dim)  # (P, C*p*p)
            block = final[:, i * pretrain_embed_dim : (i + 1) * pretrain_embed_dim] @ per_layer
            kernels.append(block.reshape(target_embed_dim, c, patch_size, patch_size).float())
        # Buffers, not parameters: fixed by the method, recomputed from config, not checkpointed.
        for i, k in enumerate(kernels):
            self.register_buffer(f"kernel{i}", k, persistent=False)
        self.num_layers = n

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Map layer features ``[(B, C_l, h_l, w_l)]`` to patch embeddings ``(B, D, h_0, w_0)``."""
        size = features[0].shape[-2:]
        out = None
        for i, feat in enumerate(features):
            kernel = getattr(self, f"kernel{i}").to(feat.dtype)
            emb = F.conv2d(feat, kernel, padding=self.patch_size // 2)
            if emb.shape[-2:] != size:
                emb = F.interpolate(emb, size=size, mode="bilinear", align_corners=False)
            out = emb if out is None else out + emb
        return out
