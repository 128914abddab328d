"""Batch functions that Ray Data runs in its tasks: decode, filter, tag with domains.

Kept free of torch and timm on purpose: every Ray Data task process imports this module, and
importing torch + timm costs ~8 s per process on a small CPU.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cdd_ray.data.images import decode_images, decode_masks


def decode_batch(table: pa.Table, split: str, category: str, image_size: int, evaluation: bool) -> dict:
    """Rows of one split (and category) with images as float32 (N, 3, S, S) in [0, 1]."""
    keep = pc.equal(table["split"], split)
    if category:
        keep = pc.and_(keep, pc.equal(table["category"], category))
    table = table.filter(keep)
    ids = table["sample_id"].to_pylist()
    out = {
        "sample_id": np.asarray(ids, dtype=object),
        "image": decode_images(table["image"].to_pylist(), ids, image_size),
    }
    if evaluation:
        out["category"] = np.asarray(table["category"].to_pylist(), dtype=object)
        out["label"] = np.asarray(table["label"].to_pylist(), dtype=np.int64)
        out["defect_type"] = np.asarray(table["defect_type"].to_pylist(), dtype=object)
        out["mask"] = decode_masks(table["mask"].to_pylist(), ids, image_size)
    return out


def add_domain(batch: dict, assignment: dict[str, int]) -> dict:
    batch["domain"] = np.asarray([assignment[sid] for sid in batch["sample_id"]], dtype=np.int64)
    return batch


def keep_domain(batch: dict, domain: int) -> dict:
    keep = batch["domain"] == domain
    return {key: value[keep] for key, value in batch.items()}


def keep_assigned(batch: dict) -> dict:
    """Drop held-out rows (domain < 0) from a training batch."""
    keep = batch["domain"] >= 0
    return {key: value[keep] for key, value in batch.items()}
