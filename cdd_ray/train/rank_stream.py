"""One rank's training rows, streamed from its dataset on every pass instead of held in memory.

A ``RankStream`` reads the rank's own dataset (``cdd_ray.data.sharding``: its shard of the global
student's data, the domains it owns, its held-out ids) block by block on every pass, keeps the rows
of the part a stage needs, and shuffles them in a window of ``window`` rows:

- rows gather in a pool; whenever the pool exceeds ``window`` rows it is put in sample-id order,
  permuted with the step's seeded generator and cut into full batches, keeping at least
  ``batch_size`` rows (the rest) in the pool;
- at the end of the pass the pool is put in sample-id order, permuted and cut as
  ``cdd_ray.train.engine.batches`` cuts (a trailing batch of one joins the one before).

A part no larger than the window is therefore shuffled whole, exactly as a set held in memory and
sorted by id would be; a larger one is shuffled within windows (what Ray Data's local shuffle
buffer does), so memory stays at one window plus a block or two. The part's rows are re-cut into
blocks of ``block_rows`` before they reach the window, so nothing depends on how the source cuts
its blocks nor on the order rows arrive in within a window: a seed gives the same batches on every
run, on a restart and from either source (for a part larger than the window they also depend on
the store's row order and on the window's size).

Two sources give a rank its rows (``cdd_ray.data.parquet_rows.uses_object_store`` decides by
size): its dataset materialized in Ray's object store, read whole on every pass (zero-copy) and
filtered to the part; or the store's Parquet file, read by the worker itself, only the row groups
and rows the part needs (``cdd_ray.data.parquet_rows.ParquetRows``).

The frozen teacher's features can be cached for the rank's training rows (``fill_cache``) when they
fit a budget (``cache_decision``); otherwise they are computed per step.

Torch only: the source is any callable that takes the sample ids a pass wants and returns an
iterable of numpy batches with ``sample_id``, ``image`` (uint8 (N, 3, S, S)) and ``domain`` that
holds at least those rows (more are dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cdd_ray.data.sharding import RankRows
from cdd_ray.data.tensors import to_float
from cdd_ray.train.engine import batches

LOGGER = logging.getLogger("cdd_ray.train")
SOURCE_BATCH = 256  # rows per block read from a rank's dataset
SHARD = "shard"
HOLDOUT = "holdout"
CHUNK = 64  # images per teacher forward when filling the cache or scoring a part in order

Source = Callable[[frozenset[str]], Iterable[dict[str, np.ndarray]]]


@dataclass
class Batch:
    """Rows of one batch: ids, uint8 images (B, 3, S, S), domains (B,) and row positions (B,) in
    the rank's sorted list of training ids (the cache's index; -1 for held-out rows)."""

    sample_ids: list[str]
    images: torch.Tensor
    domains: torch.Tensor
    positions: torch.Tensor

    def __len__(self) -> int:
        return len(self.sample_ids)

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(
            self.sample_ids[start:stop],
            self.images[start:stop],
            self.domains[start:stop],
            self.positions[start:stop],
        )


def _joined(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    return Batch(
        [sid for part in parts for sid in part.sample_ids],
        torch.cat([part.images for part in parts]),
        torch.cat([part.domains for part in parts]),
        torch.cat([part.positions for part in parts]),
    )


def batch_count(rows: int, batch_size: int) -> int:
    """How many batches a pass over ``rows`` rows gives (window or not): the full ones, plus a
    trailing one of two or more rows (one of a single row joins the batch before)."""
    full, rest = divmod(rows, batch_size)
    return full + (1 if rest >= 2 or (rest == 1 and full == 0) else 0)


class RankStream:
    """The rows of ``rows`` (one rank), read from ``source`` on every pass; see the module doc."""

    def __init__(
        self,
        source: Source,
        rows: RankRows,
        device: torch.device,
        window: int,
        block_rows: int = SOURCE_BATCH,
    ):
        """``block_rows``: rows per block that reaches the window (the source's blocks are re-cut to
        it; also the spare room the window buffer starts with)."""
        if window < 1:
            raise ValueError(f"data.shuffle_window must be at least 1 row, got {window}")
        self.source = source
        self.rows = rows
        self.device = device
        self.window = window
        self.block_rows = block_rows
        training = frozenset(rows.shard).union(*rows.domains.values())
        self.index = {sid: i for i, sid in enumerate(sorted(training))}  # cache rows; held-out: -1
        self.parts: dict[object, frozenset[str]] = {
            SHARD: frozenset(rows.shard),
            HOLDOUT: frozenset(rows.holdout),
            **{k: frozenset(ids) for k, ids in rows.domains.items()},
        }
        self.cache: list[torch.Tensor] | None = None

    def size(self, part: object) -> int:
        """Rows of ``part``: ``SHARD``, ``HOLDOUT`` or an owned domain's id."""
        return len(self.parts[part])

    def _chunks(self, members: frozenset[str]) -> Iterator[Batch]:
        """The source's rows that ``members`` holds, in source order, in blocks of exactly
        ``block_rows`` rows (the last one shorter), however the source cut its blocks."""
        pending: list[Batch] = []
        count = 0
        for block in self.source(members):
            ids = [str(sid) for sid in block["sample_id"]]
            keep = np.fromiter((sid in members for sid in ids), dtype=bool, count=len(ids))
            if not keep.any():
                continue
            chosen = np.flatnonzero(keep)
            kept = [ids[i] for i in chosen]
            pending.append(
                Batch(
                    kept,
                    torch.from_numpy(np.ascontiguousarray(block["image"][chosen])),
                    torch.from_numpy(np.asarray(block["domain"][chosen], dtype=np.int64)),
                    torch.as_tensor([self.index.get(sid, -1) for sid in kept], dtype=torch.int64),
                )
            )
            count += len(kept)
            if count >= self.block_rows:
                rows = _joined(pending)
                cut = count - count % self.block_rows
                for start in range(0, cut, self.block_rows):
                    yield rows.rows(start, start + self.block_rows)
                pending = [rows.rows(cut, count)] if cut < count else []
                count -= cut
        if count:
            yield _joined(pending)

    def shuffled(self, part: object, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """The batches of one pass over ``part``, window-shuffled with ``generator``."""
        window = _Window(min(self.window, self.size(part)) + self.block_rows)  # grows if a block is larger
        for chunk in self._chunks(self.parts[part]):
            window.add(chunk)
            if len(window) <= self.window:  # a part of exactly `window` rows is shuffled whole
                continue
            order = window.id_order()[torch.randperm(len(window), generator=generator)]
            # Keep at least one batch's worth back, so the end of the pass never yields a lone row.
            full = max(0, (len(window) - batch_size) // batch_size * batch_size)
            for start in range(0, full, batch_size):
                yield window.take(order[start : start + batch_size])
            window.keep(order[full:])
        if len(window):
            order = window.id_order()
            for index in batches(torch.arange(len(window)), batch_size, generator):
                yield window.take(order[index])

    def ordered(self, part: object, size: int = CHUNK) -> Iterator[Batch]:
        """The rows of ``part`` in source order, in batches of ``size`` (no shuffle)."""
        return self._ordered(self.parts[part], size)

    def _ordered(self, members: frozenset[str], size: int) -> Iterator[Batch]:
        window = _Window(size + self.block_rows)
        for chunk in self._chunks(members):
            window.add(chunk)
            while len(window) >= size:
                yield window.take(torch.arange(size))
                window.keep(torch.arange(size, len(window)))
        if len(window):
            yield window.take(torch.arange(len(window)))

    def images(self, batch: Batch) -> torch.Tensor:
        """The batch's images as float32 (B, 3, S, S) in [0, 1] on the device (uint8 until here)."""
        return to_float(batch.images.to(self.device))

    def training_rows(self) -> int:
        """Rows the cache would hold: the shard and the owned domains (each row once)."""
        return len(self.index)

    def positions(self, part: object) -> torch.Tensor:
        """(N,) int64: the cache positions of ``part``'s rows (``SHARD`` or an owned domain's id).

        Raises:
            ValueError: ``HOLDOUT`` (held-out rows have no cache position) or a part the rank lacks.
        """
        if part == HOLDOUT or part not in self.parts:
            raise ValueError(
                f"no cache positions for part {part!r}: SHARD or one of {sorted(self.rows.domains)}"
            )
        return torch.as_tensor(sorted(self.index[sid] for sid in self.parts[part]), dtype=torch.int64)

    def fill_cache(self, teacher: Callable[[torch.Tensor], list[torch.Tensor]]) -> None:
        """Compute the teacher's features of every training row once (``CHUNK`` rows per forward,
        source order) and keep them on the device, indexed by row position."""
        cache: list[torch.Tensor] | None = None
        with torch.no_grad():
            for chunk in self._ordered(frozenset(self.index), CHUNK):
                features = teacher(self.images(chunk))
                if cache is None:
                    rows = len(self.index)
                    cache = [level.new_empty((rows, *level.shape[1:])) for level in features]
                for store, level in zip(cache, features, strict=True):
                    store[chunk.positions.to(self.device)] = level
        self.cache = cache

    def features(self, batch: Batch) -> list[torch.Tensor] | None:
        """Cached teacher features of the batch, or None when the cache is off."""
        if self.cache is None:
            return None
        positions = batch.positions.to(self.device)
        return [level[positions] for level in self.cache]


class _Window:
    """The rows of a shuffle window in one buffer that grows only when a chunk does not fit, so
    cutting batches and keeping the rest never copies the whole window."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.images: torch.Tensor | None = None
        self.ids: list[str] = []
        self.domains = torch.empty(0, dtype=torch.int64)
        self.positions = torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, chunk: Batch) -> None:
        count, n = len(self.ids), len(chunk)
        if self.images is None or count + n > len(self.images):
            grown = chunk.images.new_empty((max(self.capacity, count + n), *chunk.images.shape[1:]))
            if self.images is not None:
                grown[:count] = self.images[:count]
            self.images = grown
        self.images[count : count + n] = chunk.images
        self.ids += chunk.sample_ids
        self.domains = torch.cat([self.domains, chunk.domains])
        self.positions = torch.cat([self.positions, chunk.positions])

    def id_order(self) -> torch.Tensor:
        """Row indices in sample-id order."""
        return torch.as_tensor(sorted(range(len(self.ids)), key=self.ids.__getitem__), dtype=torch.int64)

    def take(self, index: torch.Tensor) -> Batch:
        ids = [self.ids[i] for i in index.tolist()]
        return Batch(ids, self.images[: len(self.ids)][index], self.domains[index], self.positions[index])

    def keep(self, index: torch.Tensor) -> None:
        """Keep only rows ``index``, moved to the front of the buffer."""
        kept = self.take(index)
        self.images[: len(kept)] = kept.images
        self.ids, self.domains, self.positions = kept.sample_ids, kept.domains, kept.positions


def cache_decision(
    wanted: bool, rows: int, bytes_per_image: int, budget_mb: float, rank: int, augment: str = "none"
) -> tuple[bool, float]:
    """Whether to cache the teacher's features of ``rows`` images (``bytes_per_image`` each)
    within ``budget_mb`` MiB per worker; returns (on, MiB the cache takes) and logs the choice.
    Never with a geometric ``augment`` (``objective.augment``): every step transforms its images,
    so no step could read the cache."""
    size_mb = rows * bytes_per_image / 2**20
    if not wanted:
        LOGGER.info("rank %d: teacher-feature cache off (train.teacher_cache=false)", rank)
        return False, 0.0
    if augment != "none":
        LOGGER.info(
            "rank %d: teacher-feature cache off (objective.augment=%s transforms every image)", rank, augment
        )
        return False, 0.0
    if size_mb > budget_mb:
        LOGGER.warning(
            "rank %d: teacher-feature cache off: %d images x %.0f KiB = %.0f MiB exceeds "
            "train.teacher_cache_mb=%.0f; features are computed per step",
            rank,
            rows,
            bytes_per_image / 1024,
            size_mb,
            budget_mb,
        )
        return False, 0.0
    LOGGER.info(
        "rank %d: teacher-feature cache on: %d images x %.0f KiB = %.0f MiB (train.teacher_cache_mb=%.0f)",
        rank,
        rows,
        bytes_per_image / 1024,
        size_mb,
        budget_mb,
    )
    return True, size_mb


def target_cache_fits(features_mb: float, targets_mb: float, budget_mb: float, rank: int) -> bool:
    """Whether a ``cdd_ray.train.engine.TargetCache`` of ``targets_mb`` MiB (as large as the
    teacher-feature cache of the rows it holds: the shard's) fits beside the teacher-feature cache
    (``features_mb`` MiB: shard and owned domains) within ``budget_mb`` MiB per worker
    (``train.teacher_cache_mb``); logs the choice."""
    if features_mb + targets_mb > budget_mb:
        LOGGER.warning(
            "rank %d: pseudo-normal target cache off: it and the teacher cache would take %.0f MiB, "
            "over train.teacher_cache_mb=%.0f; the domain students run at every aggregation step",
            rank,
            features_mb + targets_mb,
            budget_mb,
        )
        return False
    LOGGER.info("rank %d: pseudo-normal target cache on: %.0f MiB", rank, targets_mb)
    return True
