"""The batch function that Ray Data runs in its tasks: filter, tag with domains, decode.

Kept free of torch and timm on purpose: every Ray Data task process imports this module, and
importing torch + timm costs ~8 s per process on a small CPU.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cdd_ray.data.images import decode_images, decode_masks


def decode_batch(
    table: pa.Table,
    split: str,
    category: str,
    image_size: int,
    evaluation: bool,
    assignment: dict[str, int] | None = None,
    holdout: bool = False,
) -> dict:
    """Rows of one split (and category) with images as float32 (N, 3, S, S) in [0, 1]; the training
    split's images (``evaluation=False``) stay uint8 in [0, 255], 4x smaller in the object store and
    in the workers, and become float32 batch by batch (``cdd_ray.data.tensors.to_float``).

    With ``assignment`` (sample id -> domain, -1 for the held-out slice) rows get a ``domain``
    column and only the assigned rows are kept (``holdout=True``: only the held-out ones), before
    any image is decoded."""
    keep = pc.equal(table["split"], split)
    if category:
        keep = pc.and_(keep, pc.equal(table["category"], category))
    table = table.filter(keep)
    domains = None
    if assignment is not None:
        domains = np.asarray([assignment[sid] for sid in table["sample_id"].to_pylist()], dtype=np.int64)
        wanted = domains < 0 if holdout else domains >= 0
        table, domains = table.filter(pa.array(wanted)), domains[wanted]
    ids = table["sample_id"].to_pylist()
    out = {
        "sample_id": np.asarray(ids, dtype=object),
        "image": decode_images(table["image"].to_pylist(), ids, image_size, as_uint8=not evaluation),
    }
    if domains is not None:
        out["domain"] = domains
    if evaluation:
        out["category"] = np.asarray(table["category"].to_pylist(), dtype=object)
        out["label"] = np.asarray(table["label"].to_pylist(), dtype=np.int64)
        out["defect_type"] = np.asarray(table["defect_type"].to_pylist(), dtype=object)
        out["mask"] = decode_masks(table["mask"].to_pylist(), ids, image_size)
    return out
