"""Anomaly maps and image scores from teacher and student features.

Map = sum over levels of (1 - channel cosine), each upsampled bilinearly to the input size, then a
Gaussian blur (sigma 4 by default, as RD4AD); image score = max of the map. All torch, batched, and
runs on whatever device the features are on.

Example::

    maps = anomaly_map(teacher_feats, student_feats, image_size=(256, 256))  # (B, H, W)
    scores = image_scores(maps)                                             # (B,)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    radius = max(1, int(math.ceil(4.0 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, maps.device).to(maps.dtype)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)
    pad_mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=pad_mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=pad_mode), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def anomaly_map(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    image_size: tuple[int, int],
    sigma: float = 4.0,
) -> torch.Tensor:
    total = None
    for t, s in zip(teacher, student, strict=True):
        distance = 1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)
        distance = F.interpolate(distance, size=image_size, mode="bilinear", align_corners=False)
        total = distance if total is None else total + distance
    return gaussian_blur(total.squeeze(1), sigma)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).amax(1)
