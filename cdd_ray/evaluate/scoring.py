"""Batched scoring with a teacher and a (global) student: anomaly maps and image scores. No Ray.

Example::

    maps, scores = score_images(teacher, student, images, batch_size=16)
"""

from __future__ import annotations

import torch
from torch import nn

from cdd_ray.models.anomaly_map import anomaly_map, image_scores
from cdd_ray.models.teacher import Teacher


@torch.no_grad()
def score_batch(
    teacher: Teacher, student: nn.Module, images: torch.Tensor, sigma: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    student.eval()
    feats = teacher(images)
    maps = anomaly_map(feats, student(feats), tuple(images.shape[-2:]), sigma)
    return maps, image_scores(maps)


@torch.no_grad()
def score_images(
    teacher: Teacher, student: nn.Module, images: torch.Tensor, batch_size: int = 16, sigma: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(student.parameters()).device
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        batch_maps, batch_scores = score_batch(
            teacher, student, images[start : start + batch_size].to(device), sigma
        )
        maps.append(batch_maps.cpu())
        scores.append(batch_scores.cpu())
    return torch.cat(maps), torch.cat(scores)
