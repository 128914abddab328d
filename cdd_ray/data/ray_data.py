"""Ray Data pipelines: read the prepared store, decode and resize in map_batches, assign domains.

The training dataset carries only ``sample_id``, ``image`` and ``domain``: no label, no ``injected``
(FUAD trains without labels; a test checks the columns). Decoding runs in Ray Data tasks
(``cdd_ray.data.batches``, torch-free); embeddings for the ``cluster`` and ``outlier`` partitions
run in an actor that holds the teacher.

Datasets are materialized before training starts, so that no lazy map_batches waits for CPUs that
the train workers hold (it would hang on a 2-CPU machine). Sample ids come straight from the
Parquet file (no image decoded); the domain assignment and a rank's rows (``keep``,
``cdd_ray.data.sharding``) are applied before decoding, so each rank's dataset holds only its
rows, decoded once, materialized in the Parquet file's row order (``preserve_order`` while it is
materialized; a materialized dataset is read back in its block order, so a worker that streams it
sees the same blocks in the same order on every run).

Example::

    rows = rank_rows(assignment, num_domains=2, rank=0, world_size=2)
    mine = read_split(store, "train", "weave", 128, assignment, keep=rows.ids()).materialize()
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from cdd_ray.data.batches import decode_block
from cdd_ray.data.store import SAMPLES_FILE, check_store

TRAIN_READ_COLUMNS = ["sample_id", "category", "split", "image"]
EVAL_READ_COLUMNS = ["sample_id", "category", "split", "label", "defect_type", "image", "mask"]


def read_split(
    store: Path,
    split: str,
    category: str,
    image_size: int,
    assignment: dict[str, int] | None = None,
    keep: frozenset[str] | None = None,
) -> ray.data.Dataset:
    """Decoded rows of one split; the train split leaves out label, defect type and injected.
    ``assignment`` adds the domain column, ``keep`` keeps only those sample ids, see
    ``cdd_ray.data.batches.decode_batch``. Blocks come out in file order; a block without wanted rows
    is empty (``decode_block``)."""
    check_store(store)
    evaluation = split != "train"
    columns = EVAL_READ_COLUMNS if evaluation else TRAIN_READ_COLUMNS
    dataset = ray.data.read_parquet(str(Path(store).resolve() / SAMPLES_FILE)).select_columns(columns)
    dataset.context.execution_options.preserve_order = True
    return dataset.map_batches(
        decode_block,
        batch_format="pyarrow",
        fn_kwargs={
            "split": split,
            "category": category,
            "image_size": image_size,
            "evaluation": evaluation,
            "assignment": assignment,
            "keep": keep,
        },
    )


class EmbedBatch:
    """Actor: pooled teacher embeddings of decoded images."""

    def __init__(self, teacher: dict):
        from cdd_ray.models.teacher import TeacherConfig, build_teacher

        self.teacher = build_teacher(TeacherConfig(**teacher))

    def __call__(self, batch: dict) -> dict:
        import torch

        from cdd_ray.data.tensors import to_float
        from cdd_ray.models.teacher import pooled_embedding

        with torch.no_grad():
            features = self.teacher(to_float(torch.from_numpy(batch["image"])))
        return {"sample_id": batch["sample_id"], "embedding": pooled_embedding(features).numpy()}


def embeddings(dataset: ray.data.Dataset, teacher: object) -> tuple[list[str], np.ndarray]:
    rows = dataset.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"teacher": vars(teacher)},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=32,
    ).take_all()
    return [r["sample_id"] for r in rows], np.stack([r["embedding"] for r in rows])
