"""Memory-bank subsampling: features ``(N, D)`` in, selected row indices ``(M,)`` out."""

import math
from typing import Protocol

import torch
from tqdm.auto import tqdm

from defectlab.errors import ConfigError


def num_samples(n: int, ratio: float) -> int:
    """Number of rows kept: ``ceil(ratio * n)``, at least 1."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"sampler.ratio must be in (0, 1], got {ratio}")
    return max(1, math.ceil(ratio * n))


class Sampler(Protocol):
    ratio: float

    def __call__(self, features: torch.Tensor) -> torch.Tensor: ...


class IdentitySampler:
    """Keep every feature (``sampler=none``)."""

    ratio = 1.0

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(features), device=features.device)


class RandomSampler:
    """Uniform random subset without replacement (``sampler=random``)."""

    def __init__(self, ratio: float = 0.1, seed: int = 0) -> None:
        num_samples(1, ratio)  # validate early, before any heavy work
        self.ratio = ratio
        self.seed = seed

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        m = num_samples(len(features), self.ratio)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(len(features), generator=g)[:m].sort().values.to(features.device)


class CoresetSampler:
    """Greedy k-center coreset on a random projection (Roth et al., Alg. 1).

    As in the paper's code (``ApproximateGreedyCoresetSampler``), the starting distances are the
    mean distances to ``num_starting_points`` random anchors; each step then adds the point
    farthest from the selected set. Distances are Euclidean in the projected space.

    Args:
        ratio: fraction of features kept (paper default 0.1).
        projection_dim: Johnson-Lindenstrauss projection dimension d* (paper code: 128);
            0 or >= D disables the projection.
        num_starting_points: random anchors for the approximate start.
        seed: seeds the projection and the anchors; same seed -> same indices.
        progress: show a progress bar with ETA.
    """

    def __init__(
        self,
        ratio: float = 0.1,
        projection_dim: int = 128,
        num_starting_points: int = 10,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        num_samples(1, ratio)
        if num_starting_points < 1:
            raise ConfigError(
                f"sampler.num_starting_points must be >= 1, got {num_starting_points}"
            )
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.num_starting_points = num_starting_points
        self.seed = seed
        self.progress = progress

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Gaussian random projection ``(N, D) -> (N, d*)`` (identity when d* is 0 or >= D)."""
        features = features.float()
        dim = features.shape[1]
        if self.projection_dim <= 0 or self.projection_dim >= dim:
            return features
        g = torch.Generator().manual_seed(self.seed)
        proj = torch.randn(dim, self.projection_dim, generator=g) / math.sqrt(self.projection_dim)
        return features @ proj.to(features.device)

    @torch.no_grad()
    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        n = len(features)
        m = num_samples(n, self.ratio)
        z = self.project(features)
        g = torch.Generator().manual_seed(self.seed + 1)
        anchors = torch.randperm(n, generator=g)[: min(self.num_starting_points, n)].to(z.device)
        # Squared distances keep the same argmax/min order as the paper's Euclidean ones.
        min_d2 = torch.cdist(z, z[anchors]).mean(dim=1).square()
        sq = z.square().sum(dim=1)
        # (d*, N) layout: a row-vector @ matrix product is ~3x faster than matrix @ vector on CPU
        # here (one sgemm instead of torch's slower gemv path), and this loop is the hot spot.
        zt = z.T.contiguous()
        selected = torch.empty(m, dtype=torch.long)
        bar = tqdm(total=m, desc="coreset", disable=not self.progress, mininterval=1.0, leave=False)
        for i in range(m):
            j = int(torch.argmax(min_d2))
            selected[i] = j
            d2 = torch.addmm(sq.unsqueeze(0), z[j].unsqueeze(0), zt, alpha=-2.0).squeeze(0) + sq[j]
            torch.minimum(min_d2, d2, out=min_d2)
            bar.update()
        bar.close()
        return selected.to(features.device)
