"""One rank's training rows read straight from the store's Parquet file, pass after pass.

The other way for a worker's rows to reach it (``cdd_ray.data.ray_data.read_split`` materialized in
Ray's object store is the first): when a rank's decoded rows would take more than
``data.object_store_mb`` (``uses_object_store``), the driver materializes nothing for it and the
worker reads its rows itself on every pass: row group by row group, only the row groups that hold
a row the pass wants, decoding only those rows (``cdd_ray.data.batches.decode_batch``). Memory is
one row group of encoded images plus its decoded wanted rows; nothing stays mapped after a pass.
The rows come in the file's order, as the materialized dataset gives them, so both paths feed the
same rows in the same order to ``cdd_ray.train.rank_stream.RankStream``.

The store must be readable at the same path on every node (as for the test set, which the workers
also read themselves). A store other than the one the driver partitioned (prepared again during the
run, or a different copy on a node) is an error, not a silent change of data: the driver passes the
store's fingerprint (``store_fingerprint``) and the worker checks it when it starts and on every
pass.

Torch-free, like every module Ray Data's tasks import.

Example::

    rows = ParquetRows(store, "weave", 128, assignment, keep=rank_rows(...).ids())
    for block in rows(frozenset(some_ids)):
        block["sample_id"], block["image"].shape  # (n,), (n, 3, 128, 128) uint8
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cdd_ray.data.batches import decode_batch
from cdd_ray.data.store import SAMPLES_FILE, StoreError, check_store

TRAIN_COLUMNS = ["sample_id", "category", "split", "image"]


def decoded_mib(rows: int, image_size: int) -> float:
    """MiB that ``rows`` decoded training images take (uint8, 3 x S x S each)."""
    return rows * 3 * image_size * image_size / 2**20


def uses_object_store(rows: int, image_size: int, budget_mb: float) -> bool:
    """Whether a rank's ``rows`` decoded images (``decoded_mib``) fit ``data.object_store_mb``, so
    that the driver materializes them in Ray's object store; otherwise the worker reads them from
    the Parquet file (``ParquetRows``)."""
    return decoded_mib(rows, image_size) <= budget_mb


def store_fingerprint(store: Path) -> str:
    """The size and a SHA-256 of the Parquet footer (row groups, their sizes and statistics) of
    ``store/samples.parquet``: the same for every copy of one prepared store, different once it is
    prepared again. Raises StoreError when the file is not a Parquet file."""
    path = Path(store) / SAMPLES_FILE
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if size < 12:
            raise StoreError(f"{path} is not a Parquet file ({size} bytes)")
        handle.seek(size - 8)
        tail = handle.read(8)
        footer = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or footer + 12 > size:
            raise StoreError(f"{path} is not a Parquet file (no footer); prepare the store again")
        handle.seek(size - 8 - footer)
        digest = hashlib.sha256(handle.read(footer)).hexdigest()
    return f"{size}:{digest}"


class ParquetRows:
    """A rank's training rows, read from ``store/samples.parquet`` on each call; see the module doc.

    ``keep``: the sample ids of the rank (``cdd_ray.data.sharding.RankRows.ids``); ``assignment``:
    sample id -> domain, for the ``domain`` column; ``category``: "" for every category;
    ``fingerprint``: ``store_fingerprint`` of the store the driver partitioned (None: the one read
    here). Raises StoreError when the store is missing or not a store, does not hold every id of
    ``keep``, or (here or on a later pass) is not the store of that fingerprint."""

    def __init__(
        self,
        store: Path,
        category: str,
        image_size: int,
        assignment: dict[str, int],
        keep: frozenset[str],
        fingerprint: str | None = None,
    ):
        check_store(store)
        self.store = Path(store)
        self.path = self.store / SAMPLES_FILE
        self.category, self.image_size, self.assignment = category, image_size, assignment
        self.fingerprint = fingerprint or store_fingerprint(self.store)
        self._check_unchanged()
        # The rank's ids in each row group that holds any, so a pass opens only those groups.
        self.groups: list[tuple[int, frozenset[str]]] = []
        found = 0
        with pq.ParquetFile(self.path) as parquet:
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=["sample_id", "category", "split"])
                wanted = pc.equal(table["split"], "train")
                if category:
                    wanted = pc.and_(wanted, pc.equal(table["category"], category))
                ids = frozenset(table.filter(wanted)["sample_id"].to_pylist()) & keep
                if ids:
                    self.groups.append((group, ids))
                    found += len(ids)
        if found != len(keep):
            raise StoreError(
                f"{self.path} lacks {len(keep) - found} of the {len(keep)} training images this worker was "
                f"given (data.category={category!r}); was the store prepared again after the run started?"
            )

    def _check_unchanged(self) -> None:
        if store_fingerprint(self.store) != self.fingerprint:
            raise StoreError(
                f"{self.path} is not the store this run partitioned (prepared again, or another copy "
                "on this node?); restart the run on the new store"
            )

    def __call__(self, members: frozenset[str]) -> Iterator[dict[str, np.ndarray]]:
        """Decoded blocks (``sample_id``, uint8 ``image`` (n, 3, S, S), ``domain``) holding exactly
        the rows of ``members`` among the rank's, in file order, one block per row group."""
        self._check_unchanged()
        with pq.ParquetFile(self.path) as parquet:
            for group, ids in self.groups:
                if ids.isdisjoint(members):
                    continue
                table = parquet.read_row_group(group, columns=TRAIN_COLUMNS)
                block = decode_batch(
                    table, "train", self.category, self.image_size, False, self.assignment, keep=ids & members
                )
                if len(block["sample_id"]):
                    yield block
