"""Locally aware patch features of PatchCore (Roth et al., CVPR 2022, section 3.1), from our teacher.

Each of the teacher's levels 2 and 3 (strides 8 and 16 on most CNNs) is averaged over a 3x3
neighbourhood (stride 1, zero padding counted, as anomalib's PatchCore does), level 3 is upsampled
bilinearly to level 2's grid, and the two are concatenated along channels: one feature vector per
level-2 position. The paper then reduces each vector by adaptive average pooling to a fixed width;
with the small teachers we run (tf_efficientnet_lite0: 40 + 112 = 152 channels) that is not needed,
and the coreset projects features for its distance computations anyway.

Example::

    features = patch_features(teacher(images))   # (B, C2 + C3, H / 8, W / 8)
    flat = to_patches(features)                   # (B * H/8 * W/8, C2 + C3)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH_LEVELS = (1, 2)  # indices into the teacher's (level 1, level 2, level 3) outputs
NEIGHBOURHOOD = 3


def patch_features(
    teacher_features: list[torch.Tensor],
    levels: tuple[int, ...] = PATCH_LEVELS,
    neighbourhood: int = NEIGHBOURHOOD,
) -> torch.Tensor:
    """(B, sum of the levels' channels, h, w) on the grid of the first level in ``levels``."""
    if not levels or max(levels) >= len(teacher_features):
        raise ValueError(f"levels {levels} do not fit a teacher with {len(teacher_features)} levels")
    grid = teacher_features[levels[0]].shape[-2:]
    parts = []
    for level in levels:
        pooled = F.avg_pool2d(teacher_features[level], neighbourhood, stride=1, padding=neighbourhood // 2)
        if pooled.shape[-2:] != grid:
            pooled = F.interpolate(pooled, size=grid, mode="bilinear", align_corners=False)
        parts.append(pooled)
    return torch.cat(parts, dim=1)


def to_patches(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B * h * w, C), image-major then row-major."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
