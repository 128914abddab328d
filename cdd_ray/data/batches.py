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
    keep: frozenset[str] | None = None,
) -> dict[str, np.ndarray]:
    """Rows of one split (and category) with images as float32 (N, 3, S, S) in [0, 1]; the training
    split's images (``evaluation=False``) stay uint8 in [0, 255], 4x smaller in the object store and
    in the workers, and become float32 batch by batch (``cdd_ray.data.tensors.to_float``).

    With ``assignment`` (sample id -> domain, -1 for the held-out slice) rows get a ``domain``
    column. With ``keep`` only the rows whose sample id it holds are kept (one rank's rows,
    ``cdd_ray.data.sharding``). Both apply before any image is decoded. No wanted row: every array
    has length 0."""
    wanted = pc.equal(table["split"], split)
    if category:
        wanted = pc.and_(wanted, pc.equal(table["category"], category))
    table = table.filter(wanted)
    if keep is not None:
        table = table.filter(pa.array([sid in keep for sid in table["sample_id"].to_pylist()], pa.bool_()))
    ids = table["sample_id"].to_pylist()
    domains = None
    if assignment is not None:
        domains = np.asarray([assignment[sid] for sid in ids], dtype=np.int64)
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


def decode_block(table: pa.Table, **kwargs) -> dict[str, np.ndarray] | pa.Table:
    """``decode_batch`` for Ray Data's ``map_batches`` (same arguments): a block with none of the
    wanted rows becomes an empty table without columns, which Ray Data skips. Ray Data cannot type
    an empty (0, 3, S, S) array as a tensor column; it would store that block's images as pickled
    Python objects, under another schema, with a warning on every run."""
    out = decode_batch(table, **kwargs)
    return out if len(out["sample_id"]) else pa.table({})
