"""PatchCore and SoftPatch on our teacher: building the memory bank from training features. No Ray.

``build_memory_bank`` takes the locally aware patch features of every training image and returns
the bank:

- PatchCore (``denoise=False``): greedy coreset of all training patches;
- SoftPatch (``denoise=True``): outlier score of each patch among the patches at its position,
  the ``drop_ratio`` most suspicious share removed, greedy coreset of the rest, and each kept
  patch's outlier score stored as its soft weight (when ``soft_weights``).

Example::

    bank = build_memory_bank(patch_features(teacher(train_images)), MemoryBankConfig(), denoise=True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdd_ray.models.patchcore.coreset import coreset_size, greedy_coreset
from cdd_ray.models.patchcore.memory_bank import MemoryBank
from cdd_ray.models.patchcore.softpatch import keep_mask, patch_outlier_scores


@dataclass
class MemoryBankConfig:
    coreset_ratio: float = 0.1  # PatchCore's 10 %
    projection_dim: int = 128  # random projection for coreset distances (PatchCore: 128)
    num_neighbors: int = 9  # b of the image-score reweighting (PatchCore: 9)
    reweight: bool = True  # PatchCore's reweighting of the image score
    search: str = "torch"  # nearest-neighbour backend: torch or faiss
    # SoftPatch only
    drop_ratio: float = 0.15  # share of training patches dropped as noise (SoftPatch: 0.15)
    outlier_score: str = "lof"  # lof or knn
    outlier_neighbors: int = 6  # k of LOF / kNN (SoftPatch: 6)
    soft_weights: bool = True  # multiply distances by the bank patch's outlier score


def build_memory_bank(
    features: torch.Tensor, config: MemoryBankConfig, denoise: bool = False, seed: int = 0
) -> tuple[MemoryBank, dict]:
    """The bank from patch features (N, D, h, w) of N training images, and a summary dict
    (patches before and after denoising, coreset size)."""
    count, dim, height, width = features.shape
    per_image = features.permute(0, 2, 3, 1).reshape(count, height * width, dim)
    flat = per_image.reshape(-1, dim)
    allowed, weights = None, None
    summary = {"training_patches": int(flat.shape[0])}
    if denoise:
        scores = patch_outlier_scores(per_image, config.outlier_score, config.outlier_neighbors)
        allowed = keep_mask(scores, config.drop_ratio).flatten()
        weights = scores.flatten().clamp_min(0) if config.soft_weights else None
        summary["dropped_patches"] = int((~allowed).sum())
    candidates = int(flat.shape[0] if allowed is None else allowed.sum())
    size = coreset_size(candidates, config.coreset_ratio)
    chosen = greedy_coreset(flat, size, seed, config.projection_dim, allowed)
    summary["coreset_size"] = size
    bank = MemoryBank(
        flat[chosen].float().contiguous(), None if weights is None else weights[chosen], (height, width)
    )
    return bank, summary
