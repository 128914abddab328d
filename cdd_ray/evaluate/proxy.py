"""A label-free model-selection proxy: the global student's distillation loss on held-out images.

In the fully unsupervised setting no labeled validation set exists. The held-out slice is part of
the noisy training set (``data.holdout_fraction``), never trained on. A student that generalizes
reproduces the teacher on unseen normal images; the few anomalies in the slice would dominate a
plain mean, so the worst-reconstructed share (``eval.proxy_trim``) is dropped first. Lower is better.

Example::

    losses = per_image_loss(teacher, student, images)
    proxy = trimmed_mean(losses.numpy(), trim=0.1)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from cdd_ray.models.distillation.losses import DEFAULT_HARD_SHARE, rd_loss
from cdd_ray.models.teacher import Teacher


@torch.no_grad()
def per_image_loss(
    teacher: Teacher,
    student: nn.Module,
    images: torch.Tensor,
    form: str = "flat",
    hard_share: float = DEFAULT_HARD_SHARE,
) -> torch.Tensor:
    """(N,) distillation loss of each image, in the run's loss form (``objective.loss_form``)."""
    student.eval()
    features = teacher(images)
    return rd_loss(student(features), features, form, reduction="none", hard_share=hard_share)


def trimmed_mean(values: np.ndarray, trim: float) -> float:
    """Mean of the lowest (1 - trim) share of the values."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    if values.size == 0:
        raise ValueError("no held-out images: set data.holdout_fraction > 0")
    keep = max(1, values.size - math.floor(trim * values.size))
    return float(values[:keep].mean())
