"""Greedy coreset subsampling of a memory bank (PatchCore, Roth et al., CVPR 2022, Algorithm 1).

The greedy k-center rule (Sener & Savarese, ICLR 2018): start from one seeded random patch, then
repeatedly add the patch farthest from everything chosen so far, so the chosen set covers the bank
with the smallest worst-case distance the greedy rule can give. As in the paper, distances are
computed on a seeded Gaussian random projection of the features (Johnson-Lindenstrauss) when they are
wider than ``projection_dim``. ``allowed`` restricts the candidates (SoftPatch drops the patches it
judges noisy before the coreset).

Cost: O(N * M * d) for N patches, M chosen, d projected dimensions; runs on the features' device.

Example::

    chosen = greedy_coreset(bank, size=coreset_size(len(bank), 0.1), seed=0)   # (M,) int64 indices
"""

from __future__ import annotations

import math

import torch

PROJECTION_DIM = 128


def coreset_size(count: int, ratio: float) -> int:
    """M = ceil(ratio * count), at least 1; ``ratio`` in (0, 1]."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must lie in (0, 1], got {ratio}")
    return max(1, min(count, math.ceil(ratio * count)))


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """(N, D) -> (N, dim) with a seeded Gaussian matrix scaled by 1/sqrt(dim); identity when D <= dim."""
    if dim <= 0 or features.shape[1] <= dim:
        return features
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    return features @ matrix.to(features.device, features.dtype)


def greedy_coreset(
    features: torch.Tensor,
    size: int,
    seed: int = 0,
    projection_dim: int = PROJECTION_DIM,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (size,) of a greedy k-center coreset of ``features`` (N, D), in the order chosen.

    ``allowed``: optional (N,) bool mask of candidates; chosen indices always come from it.
    Raises ValueError when fewer candidates than ``size`` exist."""
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
    candidates = torch.ones(len(features), dtype=torch.bool, device=features.device)
    if allowed is not None:
        candidates = allowed.to(features.device).bool()
    available = int(candidates.sum())
    if not 1 <= size <= available:
        raise ValueError(f"coreset size {size} must lie in [1, {available}] (candidate patches)")
    points = random_projection(features.float(), projection_dim, seed)[candidates]
    original = torch.nonzero(candidates).squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(len(points), (1,), generator=generator))
    chosen = [first]
    # squared distances by |x|^2 + |p|^2 - 2 x.p: one matrix-vector product per step
    norms = (points * points).sum(1)
    nearest = (norms + norms[first] - 2.0 * points @ points[first]).clamp_min(0)
    for _ in range(size - 1):
        index = int(torch.argmax(nearest))
        chosen.append(index)
        torch.minimum(
            nearest, (norms + norms[index] - 2.0 * points @ points[index]).clamp_min(0), out=nearest
        )
    return original[torch.as_tensor(chosen, device=original.device)]
