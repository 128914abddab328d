"""Fit any method in one process from in-memory images and return its detector. No Ray.

What benchmarks and tests use to compare methods on the same teacher, images and protocol without
Ray's start-up; the Ray workers run the same steps (``CDDEngine``, ``build_memory_bank``) on their
shards. Images: float32 (N, 3, S, S) in [0, 1], on the teacher's device (CPU or GPU); ``sample_ids``
name them (partitions and the held-out slice are seeded functions of the ids, as in a Ray run).

Example::

    detector, info = fit_detector(config, teacher, images, sample_ids)
    maps, scores = score_in_batches(detector, test_images)
"""

from __future__ import annotations

import numpy as np
import torch

from cdd_ray.config import Config, excluded_target_domains
from cdd_ray.data.domains import assign_domains, holdout_mask
from cdd_ray.evaluate.proxy import per_image_loss, trimmed_mean
from cdd_ray.models.detector import (
    DistillationDetector,
    PatchCoreDetector,
    distance_scale,
    distillation_detector,
)
from cdd_ray.models.distillation.student import student_spec
from cdd_ray.models.patchcore.features import patch_features
from cdd_ray.models.patchcore.model import build_memory_bank
from cdd_ray.models.teacher import Teacher, pooled_embedding
from cdd_ray.train.engine import CDDEngine, fit_in_process

FEATURE_CHUNK = 32


@torch.no_grad()
def training_patch_features(teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
    """PatchCore's locally aware patch features (N, D, h, w) of every image, in chunks."""
    return torch.cat(
        [patch_features(teacher(images[i : i + FEATURE_CHUNK])) for i in range(0, len(images), FEATURE_CHUNK)]
    )


def fit_memory_bank_detector(
    config: Config, teacher: Teacher, images: torch.Tensor
) -> tuple[PatchCoreDetector, dict]:
    features = training_patch_features(teacher, images)
    bank, summary = build_memory_bank(
        features, config.memory_bank, denoise=config.method == "softpatch", seed=config.train.seed
    )
    return PatchCoreDetector(teacher, bank, config.memory_bank, config.eval.sigma), summary


def partition(config: Config, teacher: Teacher, images: torch.Tensor, sample_ids: list[str]) -> np.ndarray:
    """Domain of each image (K = 1: all zeros), as a Ray run assigns it."""
    vectors = None
    if config.train.num_domains > 1 and config.data.partition != "random":
        with torch.no_grad():
            chunks = range(0, len(images), FEATURE_CHUNK)
            embedded = [pooled_embedding(teacher(images[i : i + FEATURE_CHUNK])) for i in chunks]
            vectors = torch.cat(embedded).cpu().numpy()
    return assign_domains(
        sample_ids,
        config.data.partition,
        config.train.num_domains,
        config.train.seed,
        vectors,
        config.data.outlier_domains,
    )


def fit_distillation_detector(
    config: Config, teacher: Teacher, images: torch.Tensor, sample_ids: list[str]
) -> tuple[DistillationDetector, dict]:
    """RD or CDD. ``eval.select=proxy`` keeps the aggregation epoch whose evaluation student has the
    lowest trimmed distillation loss on the held-out slice (``data.holdout_fraction`` > 0).
    ``info``: the loss history, each trained image's domain and id, and the trained ``engine``
    (its domain students, e.g. for a probe that scores images with the students that never saw them)."""
    held_out = holdout_mask(sample_ids, config.data.holdout_fraction, config.train.seed)
    kept = np.flatnonzero(~held_out)
    train_images = images[torch.as_tensor(kept)]
    train_ids = [sample_ids[i] for i in kept]
    domains = partition(config, teacher, train_images, train_ids)
    spec = student_spec(teacher.channels, teacher.reductions, config.teacher.backbone, config.student)
    engine = CDDEngine.create(
        teacher,
        spec,
        config.train.num_domains,
        config.objective,
        config.optim,
        seed=config.train.seed,
        excluded_sources=excluded_target_domains(config),
    )
    select_on = None
    if config.eval.select == "proxy":
        if not held_out.any():
            raise ValueError("eval.select=proxy: the held-out slice is empty (data.holdout_fraction)")
        holdout_images = images[torch.as_tensor(np.flatnonzero(held_out))]

        def select_on(student: torch.nn.Module) -> float:
            form, share = config.objective.loss_form, config.objective.hard_share
            losses = per_image_loss(teacher, student, holdout_images, form, share)
            return trimmed_mean(losses.cpu().numpy(), config.eval.proxy_trim)

    history = fit_in_process(
        engine,
        train_images,
        torch.as_tensor(domains, dtype=torch.long),
        config.train.epochs,
        config.train.batch_size,
        seed=config.train.seed,
        teacher_cache=config.train.teacher_cache,
        schedule=config.train.schedule,
        select_on=select_on,
    )
    student = engine.evaluation_student()
    scale = distance_scale(teacher, student, train_images) if config.eval.distance == "cos_l2" else None
    detector = distillation_detector(teacher, student, config.eval, scale)
    return detector, {
        "history": history,
        "domains": domains.tolist(),
        "train_ids": train_ids,
        "engine": engine,
    }


def fit_detector(
    config: Config, teacher: Teacher, images: torch.Tensor, sample_ids: list[str]
) -> tuple[torch.nn.Module, dict]:
    """The detector of ``config.method`` trained (or, for memory banks, built) on ``images``."""
    torch.manual_seed(config.train.seed)
    if config.method == "distillation":
        return fit_distillation_detector(config, teacher, images, sample_ids)
    return fit_memory_bank_detector(config, teacher, images)
