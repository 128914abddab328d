"""The FUAD contamination protocol: move anomalous test images into the training set.

Definition (SoftPatch, Jiang et al., NeurIPS 2022): for noise ratio r, n = round(r * N_train_normal)
anomalous test images of the category join the training set, drawn with a seeded RNG across all
defect types. ``overlap=False`` (default) removes them from the test set; ``overlap=True`` keeps the
test set whole. ``defect_types`` restricts the draw to those defect types (concentrated
contamination: every injected anomaly of one kind, the case where plain RD learns the anomaly as
normal). If n exceeds the anomalies available, that is an error unless ``resample=True``:
then augmented copies (rotation within 3 degrees, translation within 3 percent) fill the gap.

The selection is a manifest (sample ids per category) that a later prepare with the same settings
reuses, so the same seed and ratio always give the same files.

Example::

    plan = plan_contamination(entries, ratio=0.1, overlap=False, seed=0)
    entries = apply_contamination(entries, plan)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cdd_ray.data.sources import SourceEntry

AUGMENT_MAX_DEGREES = 3.0
AUGMENT_MAX_SHIFT = 0.03


class ContaminationError(ValueError):
    """The requested contamination cannot be met; the message says why."""


@dataclass
class ContaminationPlan:
    ratio: float
    overlap: bool
    seed: int
    resample: bool = False
    defect_types: tuple[str, ...] = ()  # empty: every defect type
    injected: dict[str, list[str]] = field(default_factory=dict)  # category -> sample ids (repeats = copies)

    def settings(self) -> dict:
        return {
            "ratio": self.ratio,
            "overlap": self.overlap,
            "seed": self.seed,
            "resample": self.resample,
            "defect_types": list(self.defect_types),
        }


def plan_contamination(
    entries: list[SourceEntry],
    ratio: float,
    overlap: bool = False,
    seed: int = 0,
    resample: bool = False,
    defect_types: tuple[str, ...] | list[str] = (),
) -> ContaminationPlan:
    if not 0 <= ratio < 1:
        raise ContaminationError(f"noise ratio must lie in [0, 1), got {ratio}")
    wanted_types = tuple(sorted(defect_types))
    plan = ContaminationPlan(ratio, overlap, seed, resample, wanted_types)
    for category in sorted({e.category for e in entries}):
        normals = sum(1 for e in entries if e.category == category and e.split == "train" and e.label == 0)
        anomalies = [e for e in entries if e.category == category and e.split == "test" and e.label == 1]
        if wanted_types and ratio > 0:
            known = {e.defect_type for e in anomalies}
            missing = [t for t in wanted_types if t not in known]
            if missing:
                raise ContaminationError(
                    f"category {category!r} has no test anomalies of defect type(s) {missing}; "
                    f"it has {sorted(known)}"
                )
            anomalies = [e for e in anomalies if e.defect_type in wanted_types]
        pool = sorted(e.sample_id for e in anomalies)
        wanted = int(round(ratio * normals))
        rng = np.random.default_rng([seed, sum(category.encode())])
        if wanted > len(pool) and not resample:
            raise ContaminationError(
                f"category {category!r}: noise ratio {ratio} needs {wanted} anomalous images "
                f"(of {normals} clean training images) but only {len(pool)} exist; lower the ratio "
                "or pass --resample for augmented copies"
            )
        if wanted <= len(pool):
            chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=wanted, replace=False))]
        else:
            chosen = pool + [pool[i] for i in rng.choice(len(pool), size=wanted - len(pool), replace=True)]
        plan.injected[category] = chosen
    return plan


def augment(
    image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Small rotation and translation, applied identically to image and mask."""
    angle = rng.uniform(-AUGMENT_MAX_DEGREES, AUGMENT_MAX_DEGREES)
    height, width = image.shape[:2]
    shift = (rng.uniform(-1, 1) * AUGMENT_MAX_SHIFT * width, rng.uniform(-1, 1) * AUGMENT_MAX_SHIFT * height)

    def move(pil: Image.Image, resample: int) -> Image.Image:
        return pil.rotate(angle, resample=resample, translate=shift, fillcolor=None)

    moved = np.asarray(move(Image.fromarray(image), Image.BILINEAR))
    moved_mask = None
    if mask is not None:
        moved_mask = np.asarray(move(Image.fromarray(mask.astype(np.uint8) * 255), Image.NEAREST)) >= 128
    return moved, moved_mask


def apply_contamination(entries: list[SourceEntry], plan: ContaminationPlan) -> list[SourceEntry]:
    """Entries after contamination; injected copies get ids ``<id>@train`` (``@train<n>`` for repeats)."""
    by_id = {e.sample_id: e for e in entries}
    moved_ids = {sid for ids in plan.injected.values() for sid in ids}
    missing = sorted(moved_ids - by_id.keys())
    if missing:
        raise ContaminationError(f"contamination manifest names samples not in the source: {missing[:5]}")
    result = [e for e in entries if plan.overlap or e.sample_id not in moved_ids]
    for ids in plan.injected.values():
        seen: dict[str, int] = {}
        for sample_id in ids:
            copy = seen.get(sample_id, 0)
            seen[sample_id] = copy + 1
            suffix = "@train" if copy == 0 else f"@train{copy}"
            result.append(
                dataclasses.replace(
                    by_id[sample_id],
                    sample_id=sample_id + suffix,
                    split="train",
                    injected=True,
                    augment_seed=None if copy == 0 else copy,
                )
            )
    return result
