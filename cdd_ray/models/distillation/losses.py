"""Reverse-distillation losses and the Cross-Domain Distillation (CDD) objective.

``rd_loss`` compares a student's feature maps with a target's, summed over levels:

- ``flat`` (RD4AD's code): 1 - cosine of each whole flattened map, per image;
- ``pixel`` (RD4AD's paper text): 1 - cosine over channels at each position, averaged;
- ``hard``: the same per-position distances, but only the ``hard_share`` largest of each image
  and level are averaged, rounded up to whole positions (hard feature mining, after EfficientAD's
  hard loss, Batzner et al., WACV 2024, which keeps the distances above their 0.999-quantile): the
  student is pushed on the positions it reproduces worst, e.g. the image border, instead of on the
  easy majority. A per-position weight (a gate) multiplies the distances before the largest are
  taken, so a weight of 0 drops a position and a soft weight shrinks the term (``pixel`` instead
  divides by the weights' sum). The loss's scale depends on the share, so the held-out proxy
  (computed in the run's own form) does not compare runs of different shares.

CDD (our reading of arXiv 2508.18007, see README): the global student G learns from pseudo-normal
targets P(x), the aggregate of the domain students of every domain other than x's own, and from the
teacher, ``lambda_cross * L(G, P) + lambda_teacher * L(G, T)``. Optional agreement gating weights the
teacher term per position by how well P reproduces T there: where the other domains cannot reproduce
the teacher, the position is likely anomalous and the global student should not learn it.

Example::

    targets = pseudo_normal_targets(domain_outputs, domain_ids, aggregation="mean")
    loss = global_student_loss(global_out, teacher_feats, targets, ObjectiveConfig())
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdd_ray.models.symmetry import GROUPS, apply, check_shape, group_elements

LOSS_FORMS = ("flat", "pixel", "hard")
AGGREGATIONS = ("mean", "median")
# geometric augmentation of the training images: none, a random flip (horizontal, vertical, both or
# none), or a random element of the dihedral group D4 (the four 90-degree rotations, each flipped or not)
AUGMENTS = GROUPS
EPS = 1e-8
DEFAULT_HARD_SHARE = 0.1


@dataclass
class ObjectiveConfig:
    loss_form: str = "flat"
    # loss_form=hard: the share of each image's positions (per level) whose distances are averaged
    hard_share: float = DEFAULT_HARD_SHARE
    aggregation: str = "mean"
    lambda_cross: float = 1.0
    # 2: chosen from bench/quality_grid.py (ablation, then the 3-seed follow-up grid; BENCHMARKS.md)
    lambda_teacher: float = 2.0
    gating: bool = False
    gating_temperature: float = 0.1
    # with data.partition=outlier: false keeps the suspicious domains' students out of every image's
    # pseudo-normal targets (the clean domains then learn from each other only)
    outlier_domain_targets: bool = True
    # relative gate: the teacher term is dropped at the share q of positions (per level) whose
    # disagreement 1 - cos(P, T) exceeds a running (1 - q)-quantile of it; 0: off
    gate_quantile: float = 0.0
    # per-image trimming: the teacher term is dropped for this share of each batch's images, those
    # whose mean disagreement between P and T is largest; 0: off
    teacher_trim: float = 0.0
    # feature jittering of the students' input (``jitter_features``): the noise std at each position
    # in units of that position's RMS feature value; the targets stay clean; 0: off
    feature_jitter: float = 0.0
    # share of a batch's images that get a pasted patch (``cut_paste``) in the students' input; the
    # targets stay the teacher's features of the clean images; 0: off
    synthetic_anomalies: float = 0.0
    # geometric augmentation of the training images (``random_dihedral``, one of AUGMENTS): the
    # teacher's features are taken of the transformed images, which become input and target alike
    # (no teacher-feature cache is filled then: no step could read it)
    augment: str = "none"


def _level_loss(
    student: torch.Tensor,
    target: torch.Tensor,
    form: str,
    weight: torch.Tensor | None,
    hard_share: float = DEFAULT_HARD_SHARE,
) -> torch.Tensor:
    """Per-image loss for one level; ``weight`` is a per-position weight of shape (B, 1, H, W)."""
    if form == "hard":
        distance = 1.0 - F.cosine_similarity(student, target, dim=1, eps=EPS)
        if weight is not None:
            distance = distance * weight[:, 0]
        flat = distance.flatten(1)
        count = max(1, math.ceil(hard_share * flat.shape[1] - 1e-9))  # 0.07 * 100 is 7.000000000000001
        return torch.topk(flat, count, dim=1).values.mean(1)
    if form == "flat":
        if weight is not None:
            student, target = student * weight, target * weight
        return 1.0 - F.cosine_similarity(student.flatten(1), target.flatten(1), dim=1, eps=EPS)
    if form == "pixel":
        distance = 1.0 - F.cosine_similarity(student, target, dim=1, eps=EPS).unsqueeze(1)
        if weight is None:
            return distance.flatten(1).mean(1)
        return (distance * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(EPS)
    raise ValueError(f"loss_form must be one of {LOSS_FORMS}, got {form!r}")


def jitter_features(
    features: list[torch.Tensor], scale: float, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Feature jittering (UniAD, You et al., NeurIPS 2022, section 3.3): each level (B, C, H, W) gets
    Gaussian noise whose std at a position is ``scale * ||f||_2 / sqrt(C)``, ``scale`` times the RMS
    of that position's C channels, so one ``scale`` means the same for levels of any width. UniAD
    writes the std as ``s * ||f|| / C`` with s = 20 for C = 256, i.e. ``scale`` = 20 / 16 = 1.25 here.

    A student that reconstructs clean targets from jittered inputs cannot copy its input through
    (the "identical shortcut"), so it learns to map off-manifold features back to normal ones.
    Returns new tensors (the inputs are not changed); ``scale`` 0 returns ``features`` itself.
    Raises ValueError for a negative ``scale``.
    """
    if not 0 <= scale < float("inf"):
        raise ValueError(f"feature_jitter must be a finite number >= 0, got {scale}")
    if scale == 0:
        return features
    jittered = []
    for level in features:
        rms = level.norm(dim=1, keepdim=True) / level.shape[1] ** 0.5
        noise = torch.randn(level.shape, generator=generator, device=level.device, dtype=level.dtype)
        jittered.append(level + noise * rms * scale)
    return jittered


def cut_paste(images: torch.Tensor, share: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """CutPaste (Li et al., CVPR 2021) as a synthetic anomaly: for each image of the batch (B, 3, S, S),
    with probability ``share``, a rectangle of side 10-30 % of S, cut at a random place of another
    image of the batch (the previous one, cyclically: image 0 takes from the last), is pasted at a
    random place. Returns a new tensor;
    a batch of one, or ``share`` 0, is returned unchanged. Raises ValueError outside [0, 1].
    """
    if not 0 <= share <= 1:
        raise ValueError(f"synthetic_anomalies must lie in [0, 1], got {share}")
    batch, _, height, width = images.shape
    if share == 0 or batch < 2:
        return images
    device = images.device
    draw = torch.rand(batch, 7, generator=generator, device=device).cpu()
    out = images.clone()
    donors = images.roll(1, dims=0)
    for i, (chosen, fh, fw, sy, sx, dy, dx) in enumerate(draw.tolist()):
        if chosen >= share:
            continue
        h = max(1, int(height * (0.1 + 0.2 * fh)))
        w = max(1, int(width * (0.1 + 0.2 * fw)))
        y0, x0 = int(sy * (height - h + 1)), int(sx * (width - w + 1))
        y1, x1 = int(dy * (height - h + 1)), int(dx * (width - w + 1))
        out[i, :, y1 : y1 + h, x1 : x1 + w] = donors[i, :, y0 : y0 + h, x0 : x0 + w]
    return out


def random_dihedral(
    images: torch.Tensor, group: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each image of the batch (B, C, H, W) transformed by its own uniformly drawn element of
    ``group``: ``flips`` (identity, horizontal, vertical, both: the 180-degree rotation) or ``d4``
    (each of those four with or without a transpose: all eight symmetries of a square, which need
    H == W).
    Label-preserving for textures and for objects whose orientation varies; a user whose normal
    images have a fixed orientation (most MVTec objects) should keep ``none``.
    Returns a new tensor (``none``: ``images`` itself). Raises ValueError for another ``group`` or
    for ``d4`` on non-square images.
    """
    if group not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {group!r}")
    if group == "none":
        return images
    check_shape(group, images, "augment")
    elements = group_elements(group)
    draws = torch.randint(len(elements), (images.shape[0],), generator=generator, device=images.device)
    chosen = [elements[draw] for draw in draws.tolist()]
    return torch.stack([apply(image, symmetry) for image, symmetry in zip(images, chosen, strict=True)])


def rd_loss(
    student: list[torch.Tensor],
    target: list[torch.Tensor],
    form: str = "flat",
    weights: list[torch.Tensor] | None = None,
    reduction: str = "mean",
    hard_share: float = DEFAULT_HARD_SHARE,
) -> torch.Tensor:
    """Sum over levels of (1 - cosine); ``reduction='none'`` keeps one value per image."""
    if len(student) != len(target):
        raise ValueError(f"student has {len(student)} levels, target {len(target)}")
    per_image = sum(
        _level_loss(s, t, form, None if weights is None else w, hard_share)
        for s, t, w in zip(student, target, weights or [None] * len(student), strict=True)
    )
    return per_image.mean() if reduction == "mean" else per_image


def pseudo_normal_targets(
    domain_outputs: list[list[torch.Tensor]],
    domain_ids: torch.Tensor,
    aggregation: str = "mean",
    excluded_sources: tuple[int, ...] = (),
) -> list[torch.Tensor]:
    """For each image of domain k, aggregate the outputs of the students of every domain j != k.

    ``domain_outputs[j][level]`` is student j's output for the whole batch. Needs K >= 2.
    ``excluded_sources``: domains whose students never give targets (e.g. the outlier partition's
    suspicious domains); every image must keep at least one source.
    """
    num_domains = len(domain_outputs)
    if num_domains < 2:
        raise ValueError("pseudo-normal targets need at least two domain students")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if int(domain_ids.min()) < 0 or int(domain_ids.max()) >= num_domains:
        raise ValueError(f"domain ids must lie in [0, {num_domains}), got {domain_ids.tolist()}")
    others = torch.arange(num_domains, device=domain_ids.device)[:, None] != domain_ids[None, :]  # (K, B)
    if excluded_sources:
        if any(not 0 <= j < num_domains for j in excluded_sources):
            raise ValueError(f"excluded_sources {excluded_sources} must lie in [0, {num_domains})")
        others[list(excluded_sources)] = False
        orphaned = sorted(set(domain_ids[~others.any(0)].tolist()))
        if orphaned:
            raise ValueError(
                f"excluding the students of domains {list(excluded_sources)} leaves the images of "
                f"domains {orphaned} with no other domain's student to learn from"
            )
    targets = []
    for level in range(len(domain_outputs[0])):
        stacked = torch.stack([outputs[level] for outputs in domain_outputs])  # (K, B, C, H, W)
        mask = others.view(*others.shape, 1, 1, 1).to(stacked.dtype)
        if aggregation == "mean":
            targets.append((stacked * mask).sum(0) / mask.sum(0))
        else:
            hidden = stacked.masked_fill(mask == 0, float("nan"))
            targets.append(torch.nanmedian(hidden, dim=0).values)
    return targets


def agreement_gate(
    pseudo_normal: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float
) -> list[torch.Tensor]:
    """Per-position weight exp(-(1 - cos(P, T)) / temperature) in (0, 1], without gradient."""
    if temperature <= 0:
        raise ValueError(f"gating_temperature must be positive, got {temperature}")
    gates = []
    for p, t in zip(pseudo_normal, teacher, strict=True):
        disagreement = 1.0 - F.cosine_similarity(p.detach(), t.detach(), dim=1, eps=EPS)
        gates.append(torch.exp(-disagreement / temperature).unsqueeze(1))
    return gates


def disagreement(pseudo_normal: list[torch.Tensor], teacher: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, 1 - cos(P, T) over channels at each position: (B, H, W), no gradient."""
    return [
        1.0 - F.cosine_similarity(p.detach(), t.detach(), dim=1, eps=EPS)
        for p, t in zip(pseudo_normal, teacher, strict=True)
    ]


def trim_mask(pseudo_normal: list[torch.Tensor], teacher: list[torch.Tensor], share: float) -> torch.Tensor:
    """(B,) 1 for the images that keep the teacher term, 0 for the ``share`` of the batch whose
    disagreement (summed over levels of the per-level mean) is largest."""
    per_image = sum(d.flatten(1).mean(1) for d in disagreement(pseudo_normal, teacher))
    keep = torch.ones_like(per_image)
    dropped = int(share * len(per_image))
    if dropped:
        keep[torch.topk(per_image, dropped).indices] = 0.0
    return keep


def global_student_loss(
    global_out: list[torch.Tensor],
    teacher: list[torch.Tensor],
    pseudo_normal: list[torch.Tensor] | None,
    objective: ObjectiveConfig,
    reduction: str = "mean",
    teacher_weights: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """(lambda_cross * L(G, P) + lambda_teacher * L(G, T)) / (lambda_cross + lambda_teacher), the
    teacher term optionally gated per position (``teacher_weights``, (B, 1, H, W) per level, e.g.
    the engine's relative gate; else the absolute agreement gate when ``objective.gating``) and
    trimmed per image (``objective.teacher_trim``).

    Dividing by the weights' sum keeps the value on RD's scale whatever the weights, so losses of
    runs with other weights compare (ASHA ranks trials on them); with Adam it does not change
    training. With ``pseudo_normal=None`` (K = 1) this is exactly the RD loss; the weights only
    balance CDD's two terms.
    """
    form = objective.loss_form
    if pseudo_normal is None:
        return rd_loss(global_out, teacher, form, None, reduction, objective.hard_share)
    weights = teacher_weights
    if weights is None and objective.gating:
        weights = agreement_gate(pseudo_normal, teacher, objective.gating_temperature)
    teacher_term = rd_loss(global_out, teacher, form, weights, "none", objective.hard_share)
    if objective.teacher_trim > 0:
        keep = trim_mask(pseudo_normal, teacher, objective.teacher_trim)
        teacher_term = teacher_term * keep * (len(keep) / keep.sum().clamp_min(1.0))
    loss = objective.lambda_teacher * teacher_term
    if objective.lambda_cross:
        detached = [p.detach() for p in pseudo_normal]
        cross = rd_loss(global_out, detached, form, None, "none", objective.hard_share)
        loss = loss + objective.lambda_cross * cross
    loss = loss / (objective.lambda_cross + objective.lambda_teacher)
    return loss.mean() if reduction == "mean" else loss
