"""Anomaly maps and image scores from teacher and student features.

Map = sum over levels of a per-position distance between teacher and student features, each
upsampled bilinearly to the input size, then a Gaussian blur (sigma 4 by default, as RD4AD). Two
distances:

- ``cos``: 1 - channel cosine (RD4AD, Deng & Li, CVPR 2022, eq. 2). Blind to a change of a
  feature's length only (a stain that darkens, a scratch that brightens).
- ``cos_l2``: per level, (1 - cos) / c_l + ||T - S||_2 / e_l, where c_l and e_l are the level's
  mean of each distance over the training images (``DistanceStatistics``), so the two distances and
  the levels weigh alike. Measured in BENCHMARKS.md ("The cosine distance is blind to a feature's
  length").

Image score = the mean of the top ``top_fraction`` of the map's pixels (0: the maximum, RD4AD's).
All torch, batched, and runs on whatever device the features are on.

Example::

    maps = anomaly_map(teacher_feats, student_feats, image_size=(256, 256))  # (B, H, W)
    scores = image_scores(maps)                                             # (B,)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DISTANCES = ("cos", "cos_l2")


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


def level_distances(t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - cosine, Euclidean distance) over channels of (B, C, h, w) features, each (B, 1, h, w)."""
    cosine = 1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)
    return cosine, (t - s).norm(dim=1, keepdim=True)


def anomaly_map(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    image_size: tuple[int, int],
    sigma: float = 4.0,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, W) map of per-level (B, C_l, h_l, w_l) features. ``scale`` None: the ``cos``
    distance; a (L, 2) tensor of per-level training means (cos, l2): the ``cos_l2`` distance."""
    if scale is not None and tuple(scale.shape) != (len(teacher), 2):
        raise ValueError(
            f"scale: expected shape ({len(teacher)}, 2) for {len(teacher)} levels, got {tuple(scale.shape)}"
        )
    total = None
    for level, (t, s) in enumerate(zip(teacher, student, strict=True)):
        if scale is None:
            distance = 1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)
        else:
            cosine, euclidean = level_distances(t, s)
            distance = cosine / scale[level, 0] + euclidean / scale[level, 1]
        distance = F.interpolate(distance, size=image_size, mode="bilinear", align_corners=False)
        total = distance if total is None else total + distance
    return gaussian_blur(total.squeeze(1), sigma)


def image_scores(maps: torch.Tensor, top_fraction: float = 0.0) -> torch.Tensor:
    """(B,) scores of (B, H, W) maps: the mean of the largest max(1, floor(top_fraction x H x W))
    pixels; 0 gives the maximum. The floor forgives float rounding (0.29 x 100 is 29 pixels, not
    28.999... -> 28)."""
    flat = maps.flatten(1)
    k = max(1, math.floor(top_fraction * flat.shape[1] + 1e-9))
    if k == 1:
        return flat.amax(1)
    return flat.topk(k, dim=1).values.mean(1)


class DistanceStatistics:
    """Running per-level means of (1 - cos) and ||T - S|| over images: the ``cos_l2`` scale.

    Each image contributes its spatial mean per level (all images of a run share one size, so this is
    the mean over every position). ``sums`` (L, 2) float64 and ``images`` add up across processes
    (e.g. an all-reduce of both) before ``scale()``.
    """

    def __init__(self, levels: int, device: torch.device | None = None):
        self.sums = torch.zeros(levels, 2, dtype=torch.float64, device=device)
        self.images = 0

    @torch.no_grad()
    def update(self, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> None:
        for level, (t, s) in enumerate(zip(teacher, student, strict=True)):
            for column, distance in enumerate(level_distances(t.float(), s.float())):
                self.sums[level, column] += distance.flatten(1).mean(1).double().sum()
        self.images += len(teacher[0])

    def scale(self) -> torch.Tensor:
        """(L, 2) float32 per-level means (cos, l2). Raises ValueError when no image was seen or a
        mean is not a positive finite number (a student that copies the teacher exactly)."""
        if self.images == 0:
            raise ValueError("distance scale: no training image was seen")
        means = (self.sums / self.images).float().cpu()
        if not bool(torch.isfinite(means).all()) or bool((means <= 0).any()):
            raise ValueError(
                f"distance scale: per-level means must be positive and finite, got {means.tolist()}"
            )
        return means
