"""SoftPatch's patch-level noise discrimination (Jiang et al., NeurIPS 2022, section 3.2).

A contaminated training set puts anomalous patches in PatchCore's memory bank, where they then
match the same anomalies at test time. SoftPatch scores every training patch by how much of an
outlier it is among the patches at the SAME position in all training images (aligned images: a
defect at one position is rare across images there), drops the most suspicious share of all patches
before the coreset, and keeps each remaining patch's score as a soft weight that multiplies its
nearest-neighbour distance at test time (an outlier-ish bank patch counts as a weaker match).

Outlier scores (``outlier_score``):

- ``lof``: Local Outlier Factor (Breunig et al., 2000) with ``neighbors`` neighbours, scikit-learn's
  implementation; ~1 for inliers, larger for outliers (SoftPatch's default, k = 6 in its scripts);
- ``knn``: mean Euclidean distance to the ``neighbors`` nearest other images' patches, divided by
  its mean at that position (so that ~1 is typical, like LOF).

The share dropped (``drop_ratio``, SoftPatch's "threshold", 0.15 in its scripts) is taken over all
patches of all positions at once, as SoftPatch does.

Example::

    scores = patch_outlier_scores(features)            # features (N, P, D) -> scores (N, P)
    keep = keep_mask(scores, drop_ratio=0.15)          # (N, P) bool
"""

from __future__ import annotations

import numpy as np
import torch

OUTLIER_SCORES = ("lof", "knn")


def patch_outlier_scores(features: torch.Tensor, method: str = "lof", neighbors: int = 6) -> torch.Tensor:
    """Outlier score (N, P) of each image's patch among the N patches at its position.

    ``features``: (N, P, D) patch features of N aligned training images. Needs N > ``neighbors``
    (raises ValueError otherwise)."""
    if method not in OUTLIER_SCORES:
        raise ValueError(f"outlier_score must be one of {OUTLIER_SCORES}, got {method!r}")
    count, positions, _ = features.shape
    if count <= neighbors:
        raise ValueError(f"{count} training images: the outlier score needs more than neighbors={neighbors}")
    if method == "knn":
        return _knn_scores(features.float(), neighbors)
    from sklearn.neighbors import LocalOutlierFactor  # lazily: sklearn costs ~2 s to import

    values = features.detach().float().cpu().numpy()
    scores = np.empty((count, positions), dtype=np.float32)
    for position in range(positions):
        lof = LocalOutlierFactor(n_neighbors=neighbors, metric="euclidean")
        lof.fit(values[:, position])
        scores[:, position] = -lof.negative_outlier_factor_
    return torch.from_numpy(scores).to(features.device)


def _knn_scores(features: torch.Tensor, neighbors: int) -> torch.Tensor:
    by_position = features.transpose(0, 1)  # (P, N, D)
    distances = torch.cdist(by_position, by_position, compute_mode="donot_use_mm_for_euclid_dist")
    # the smallest distance of each row is the patch to itself (0): skip it
    nearest = torch.topk(distances, neighbors + 1, dim=2, largest=False).values[:, :, 1:].mean(2)  # (P, N)
    return (nearest / nearest.mean(1, keepdim=True).clamp_min(1e-12)).transpose(0, 1)


def keep_mask(scores: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """True for every patch except the ``drop_ratio`` share with the highest scores (over all)."""
    if not 0 <= drop_ratio < 1:
        raise ValueError(f"drop_ratio must lie in [0, 1), got {drop_ratio}")
    flat = scores.flatten()
    dropped = int(round(drop_ratio * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if dropped:
        keep[torch.topk(flat, dropped).indices] = False
    return keep.view_as(scores)
