"""Detectors: one module per method family that maps an image batch to anomaly maps and image scores.

Every path that scores images (the train workers' test scoring, ``cdd-ray evaluate``, ``predict``,
the benchmarks and the exported model) goes through these, so a method is scored one way only.

- ``DistillationDetector`` (RD and CDD): teacher + global student; map = sum over levels of the
  upsampled per-position distance (1 - cosine, RD4AD's, or with a per-level scale also the
  Euclidean distance), blurred; image score = the mean of the map's top ``top_fraction`` pixels
  (0: the maximum, RD4AD's); optionally the mean map over flips of the image (test-time
  augmentation). See ``cdd_ray.models.anomaly_map``.
- ``PatchCoreDetector`` (PatchCore and SoftPatch): teacher + memory bank; map = upsampled, blurred
  nearest-neighbour distances of the locally aware patch features; image score = the (reweighted)
  largest patch score (see ``cdd_ray.models.patchcore.memory_bank``).

Input: images (B, 3, H, W) float in [0, 1]; output: maps (B, H, W) and scores (B,), float32.

Example::

    detector = DistillationDetector(teacher, student, sigma=4.0).eval()
    maps, scores = detector(images)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from cdd_ray.models.anomaly_map import DistanceStatistics, anomaly_map, image_scores
from cdd_ray.models.patchcore.features import patch_features
from cdd_ray.models.patchcore.memory_bank import MemoryBank, score_patches
from cdd_ray.models.patchcore.model import MemoryBankConfig
from cdd_ray.models.symmetry import apply, check_shape, group_elements, undo
from cdd_ray.models.teacher import Teacher


class DistillationDetector(nn.Module):
    """``scale``: None for the cosine distance, or the (L, 2) per-level training means of the
    ``cos_l2`` distance (``DistanceStatistics.scale``), kept as a buffer so that it moves with
    ``.to(device)`` and is part of an exported graph.

    ``test_time_augment`` (a group of ``cdd_ray.models.symmetry``: ``none``, ``flips``, ``d4``):
    each image is also scored flipped (and transposed, ``d4``), every map is turned back, and the
    maps are averaged before the image score: a map that commutes with the group's symmetries, at
    4 or 8 times the scoring cost."""

    def __init__(
        self,
        teacher: Teacher,
        student: nn.Module,
        sigma: float = 4.0,
        scale: torch.Tensor | None = None,
        top_fraction: float = 0.0,
        test_time_augment: str = "none",
    ):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.sigma = sigma
        self.top_fraction = top_fraction
        self.test_time_augment = test_time_augment
        self.symmetries = group_elements(test_time_augment)
        self.distance_scale: torch.Tensor | None
        self.register_buffer("distance_scale", None if scale is None else scale.detach().float().clone())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.student.eval()
        check_shape(self.test_time_augment, images, "test_time_augment")
        if len(self.symmetries) == 1:
            maps = self._map(images)
        elif torch.jit.is_tracing() or torch.compiler.is_exporting():
            # an exported graph: every symmetry in one batch, so it holds one copy of the networks
            # (four made the ONNX export 2.5x slower); shapes by -1, never by the batch size
            stacked = self._map(torch.cat([apply(images, s) for s in self.symmetries]))
            stacked = stacked.view(len(self.symmetries), -1, *stacked.shape[-2:])
            maps = torch.stack([undo(stacked[i], s) for i, s in enumerate(self.symmetries)]).mean(0)
        else:
            # one pass per symmetry: on a CPU a 4x larger batch took lite0 twice as long per image
            maps = torch.stack([undo(self._map(apply(images, s)), s) for s in self.symmetries]).mean(0)
        return maps, image_scores(maps, self.top_fraction)

    def _map(self, images: torch.Tensor) -> torch.Tensor:
        features = self.teacher(images)
        return anomaly_map(
            features, self.student(features), tuple(images.shape[-2:]), self.sigma, self.distance_scale
        )


def distillation_detector(
    teacher: Teacher, student: nn.Module, settings, scale: torch.Tensor | None
) -> DistillationDetector:
    """The detector that a run's ``eval`` settings (``sigma``, ``distance``, ``top_fraction``,
    ``test_time_augment``; a
    ``cdd_ray.config.EvalConfig``) ask for. ``scale``: the (L, 2) training means that
    ``distance=cos_l2`` needs (ValueError when it is None); not used with ``cos``."""
    if settings.distance == "cos_l2" and scale is None:
        raise ValueError("eval.distance=cos_l2 needs the per-level distance scale of the training images")
    return DistillationDetector(
        teacher,
        student,
        settings.sigma,
        scale if settings.distance == "cos_l2" else None,
        settings.top_fraction,
        settings.test_time_augment,
    )


@torch.no_grad()
def distance_statistics(
    student: nn.Module, feature_batches: Iterable[list[torch.Tensor]], levels: int, device: torch.device
) -> DistanceStatistics:
    """Sums of the per-level (1 - cos, ||T - S||) of ``student`` over the teacher's ``feature_batches``
    (each a list of ``levels`` (B, C_l, h_l, w_l) tensors on ``device``), for
    ``DistanceStatistics.scale``. The one loop behind every ``cos_l2`` scale: a run's workers (from
    cached or fresh teacher features), ``distance_scale`` and a rebuilt checkpoint scale."""
    student.eval()
    statistics = DistanceStatistics(levels, device)
    for features in feature_batches:
        statistics.update(features, student(features))
    return statistics


def teacher_features(teacher: Teacher, image_batches: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The teacher's features of each (B, 3, S, S) batch, moved to the teacher's device."""
    device = next(iter(teacher.parameters())).device
    for batch in image_batches:
        yield teacher(batch.to(device).float())


def distance_scale(
    teacher: Teacher, student: nn.Module, images: torch.Tensor, batch_size: int = 32
) -> torch.Tensor:
    """(L, 2) per-level means of (1 - cos, ||T - S||) of ``student`` over ``images`` (N, 3, S, S),
    on the teacher's device, ``batch_size`` at a time. Raises ValueError for no images."""
    device = next(iter(teacher.parameters())).device
    batches = teacher_features(teacher, images.split(batch_size))
    return distance_statistics(student, batches, len(teacher.channels), device).scale()


class PatchCoreDetector(nn.Module):
    """The bank's tensors are buffers, so ``.to(device)`` moves them with the teacher."""

    def __init__(self, teacher: Teacher, bank: MemoryBank, config: MemoryBankConfig, sigma: float = 4.0):
        super().__init__()
        self.teacher = teacher
        self.register_buffer("bank_features", bank.features)
        self.register_buffer("bank_weights", bank.weights)
        self.patch_shape = tuple(bank.patch_shape)
        self.config = config
        self.sigma = sigma

    @property
    def bank(self) -> MemoryBank:
        return MemoryBank(self.bank_features, self.bank_weights, self.patch_shape)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = patch_features(self.teacher(images))
        return score_patches(
            self.bank,
            features,
            tuple(images.shape[-2:]),
            self.config.num_neighbors,
            self.config.reweight,
            self.sigma,
            self.config.search,
        )


@torch.no_grad()
def score_in_batches(
    detector: nn.Module, images: torch.Tensor, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (N, H, W) and scores (N,) on the CPU for images (N, 3, H, W) of any length, scored on
    the detector's device ``batch_size`` at a time."""
    device = next(iter(detector.teacher.parameters())).device
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        batch_maps, batch_scores = detector(images[start : start + batch_size].to(device).float())
        maps.append(batch_maps.float().cpu())
        scores.append(batch_scores.float().cpu())
    if not maps:
        return torch.empty(0), torch.empty(0)
    return torch.cat(maps), torch.cat(scores)
