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
    """``sampler(features) == sampler.select(sampler.project(features))``.

    ``project`` is row-wise, so it can run block by block while features stream in; ``select``
    then needs only the projections (the raw features may live on disk meanwhile).
    """

    ratio: float

    def project(self, features: torch.Tensor) -> torch.Tensor: ...

    def select(self, projected: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, features: torch.Tensor) -> torch.Tensor: ...


class _RowCountSampler:
    """Samplers that need only the number of rows: the projection keeps no columns."""

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features.new_empty(len(features), 0, dtype=torch.float32)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.select(self.project(features))


class IdentitySampler(_RowCountSampler):
    """Keep every feature (``sampler=none``)."""

    ratio = 1.0

    def select(self, projected: torch.Tensor) -> torch.Tensor:
        return torch.arange(len(projected), device=projected.device)


class RandomSampler(_RowCountSampler):
    """Uniform random subset without replacement (``sampler=random``)."""

    def __init__(self, ratio: float = 0.1, seed: int = 0) -> None:
        num_samples(1, ratio)  # validate early, before any heavy work
        self.ratio = ratio
        self.seed = seed

    def select(self, projected: torch.Tensor) -> torch.Tensor:
        m = num_samples(len(projected), self.ratio)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(len(projected), generator=g)[:m].sort().values.to(projected.device)


class CoresetSampler:
    """Greedy k-center coreset on a random projection (Roth et al., Alg. 1).

    As in the paper's code (``ApproximateGreedyCoresetSampler``), the starting distances are the
    mean distances to ``num_starting_points`` random anchors; each step then adds the point
    farthest from the selected set. Distances are Euclidean in the projected space.

    The straightforward loop updates all N distances after every pick: one pass over the whole
    projected matrix per selected point, memory-bound (145 s for 10 % of 249k x 128 on 2 cores).
    Here the updates are deferred without changing the result: the current distances are upper
    bounds of the true ones (they only shrink), so only the ``candidates`` points with the largest
    bounds are kept exact, one small update per pick. Their maximum is the true argmax as long as
    it exceeds every other point's bound; when it does not, the deferred centres are applied to
    all points as one matrix product (compute-bound, not memory-bound) and new candidates are
    taken. Same picks in the same order as the literal loop (tested); on large float32 inputs two
    consecutive picks whose distances tie to the last bit may come out in swapped order.

    Args:
        ratio: fraction of features kept (paper default 0.1).
        projection_dim: Johnson-Lindenstrauss projection dimension d* (paper code: 128);
            0 or >= D disables the projection.
        num_starting_points: random anchors for the approximate start.
        seed: seeds the projection and the anchors; same seed -> same indices.
        candidates: size of the exactly-maintained candidate set (speed only, not the result).
        progress: show a progress bar with ETA.
    """

    # Bounds the temporaries: rows per projection block, elements per deferred-update block.
    _block = 16384
    _block_elems = 4 * 2**20

    def __init__(
        self,
        ratio: float = 0.1,
        projection_dim: int = 128,
        num_starting_points: int = 10,
        seed: int = 0,
        candidates: int = 8192,
        progress: bool = True,
    ) -> None:
        num_samples(1, ratio)
        if num_starting_points < 1:
            raise ConfigError(
                f"sampler.num_starting_points must be >= 1, got {num_starting_points}"
            )
        if candidates < 1:
            raise ConfigError(f"sampler.candidates must be >= 1, got {candidates}")
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.num_starting_points = num_starting_points
        self.seed = seed
        self.candidates = candidates
        self.progress = progress

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Gaussian random projection ``(N, D) -> (N, d*)`` float32 (identity when d* is 0 or >= D).

        Blockwise, so a float16 feature buffer is never copied whole to float32.
        """
        dim = features.shape[1]
        if self.projection_dim <= 0 or self.projection_dim >= dim:
            return features.float()
        g = torch.Generator().manual_seed(self.seed)
        proj = torch.randn(dim, self.projection_dim, generator=g) / math.sqrt(self.projection_dim)
        proj = proj.to(features.device)
        out = torch.empty(len(features), self.projection_dim, device=features.device)
        for start in range(0, len(features), self._block):
            block = features[start : start + self._block].float()
            torch.mm(block, proj, out=out[start : start + self._block])
        return out

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.select(self.project(features))

    @torch.no_grad()
    def select(self, z: torch.Tensor) -> torch.Tensor:
        """Greedy k-center indices ``(M,)`` from projected features ``z`` ``(N, d*)``."""
        n = len(z)
        m = num_samples(n, self.ratio)
        g = torch.Generator().manual_seed(self.seed + 1)
        anchors = torch.randperm(n, generator=g)[: min(self.num_starting_points, n)].to(z.device)
        # Squared distances keep the same argmax/min order as the paper's Euclidean ones.
        # Blockwise: whole-matrix cdist and square() each allocate copies the size of z.
        blocks = z.split(self._block)
        min_d2 = torch.cat([torch.cdist(b, z[anchors]).mean(dim=1) for b in blocks]).square()
        sq = torch.cat([b.square().sum(dim=1) for b in blocks])
        selected: list[int] = []
        pending: list[int] = []  # picked since the last full update
        bar = tqdm(total=m, desc="coreset", disable=not self.progress, mininterval=1.0, leave=False)
        while len(selected) < m:
            self._apply(z, sq, min_d2, pending)
            pending = []
            top = min(self.candidates, n)
            values, cand = torch.topk(min_d2, min(top + 1, n))
            # Every point outside the candidates has a true distance <= its bound <= bound.
            bound = float(values[top]) if top < n else -math.inf
            cand = cand[:top].sort().values  # ascending index: argmax ties go to the lowest
            zc = z[cand]
            zct, sqc, dc = zc.T.contiguous(), sq[cand], min_d2[cand]
            while len(selected) < m:
                a = int(torch.argmax(dc))
                if float(dc[a]) <= bound:
                    break  # a point outside the candidates may be farther: full update
                j = int(cand[a])
                selected.append(j)
                pending.append(j)
                # Same expression and order of operations as the straightforward loop.
                d2 = torch.addmm(sqc.unsqueeze(0), zc[a].unsqueeze(0), zct, alpha=-2.0)
                torch.minimum(dc, d2.squeeze(0) + sq[j], out=dc)
                bar.update()
            min_d2[cand] = dc
        bar.close()
        return torch.tensor(selected, dtype=torch.long, device=z.device)

    def _apply(
        self, z: torch.Tensor, sq: torch.Tensor, min_d2: torch.Tensor, centres: list[int]
    ) -> None:
        """``min_d2 = min(min_d2, ||z - z[c]||^2 for c in centres)``, blockwise."""
        if not centres:
            return
        idx = torch.tensor(centres, device=z.device)
        zt, sq_c = z[idx].T.contiguous(), sq[idx]
        # Rows per block so that one (rows, centres) distance block stays at _block_elems.
        step = max(256, self._block_elems // len(centres))
        for start in range(0, len(z), step):
            rows = slice(start, start + step)
            d2 = torch.addmm(sq[rows].unsqueeze(1), z[rows], zt, alpha=-2.0).add_(sq_c)
            torch.minimum(min_d2[rows], d2.min(dim=1).values, out=min_d2[rows])
