"""The prepared store: one Parquet file with a row per image, plus JSON side files.

Layout of a store directory::

    samples.parquet      sample_id, category, split, label, defect_type, image (PNG), mask (PNG|null),
                         source_path, injected
    store.json           format version, source, counts, contamination settings
    contamination.json   the injected sample ids per category (reused by a later prepare)

Every file is written under a temporary name and renamed, so a crash leaves the old file or the new
one. ``injected`` is for analysis only: the training reader (``ray_data.TRAIN_READ_COLUMNS``) leaves it out.

Example::

    summary = write_store(entries, Path("data/synthetic"), source="synthetic")
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cdd_ray.data.contamination import ContaminationPlan, augment
from cdd_ray.data.images import (
    BadImageError,
    MaskMismatchError,
    encode_mask,
    encode_png,
    read_image,
    read_mask,
)
from cdd_ray.data.sources import SourceEntry

STORE_FORMAT_VERSION = 1
SAMPLES_FILE = "samples.parquet"
STORE_FILE = "store.json"
MANIFEST_FILE = "contamination.json"
ROW_GROUP = 64

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("category", pa.string()),
        ("split", pa.string()),
        ("label", pa.int8()),
        ("defect_type", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("source_path", pa.string()),
        ("injected", pa.bool_()),
    ]
)


class StoreError(ValueError):
    """A store directory is missing, from another version, or inconsistent; the message says which."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
        os.chmod(temporary, 0o666 & ~_UMASK)  # what open() would give; mkstemp makes it private
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: object) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _pixels(entry: SourceEntry, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    if entry.pixels is not None:
        image, mask = entry.pixels, entry.mask
    else:
        image = read_image(entry.image_path)
        mask = read_mask(entry.mask_path, image.shape[:2], entry.image_path) if entry.mask_path else None
        if mask is not None and entry.label == 1 and not mask.any():
            raise MaskMismatchError(
                f"mask {entry.mask_path} of anomalous image {entry.image_path} marks no defect pixel "
                "(every value is 0); an anomalous image needs its defect marked"
            )
    if entry.augment_seed is not None:
        rng = np.random.default_rng([seed, entry.augment_seed, sum(entry.sample_id.encode())])
        image, mask = augment(image, mask, rng)
    return image, mask


def _rows(entries: list[SourceEntry], seed: int, skip_bad: bool, skipped: list[str]) -> Iterator[dict]:
    for entry in entries:
        try:
            image, mask = _pixels(entry, seed)
        except BadImageError as error:
            if not skip_bad:
                raise
            skipped.append(str(error))
            continue
        yield {
            "sample_id": entry.sample_id,
            "category": entry.category,
            "split": entry.split,
            "label": entry.label,
            "defect_type": entry.defect_type,
            "image": encode_png(image),
            "mask": None if mask is None else encode_mask(mask),
            "source_path": entry.source_path,
            "injected": entry.injected,
        }


def write_store(
    entries: list[SourceEntry],
    out: Path,
    source: str,
    plan: ContaminationPlan | None = None,
    skip_bad: bool = False,
) -> dict:
    """Write the store; returns the summary written to store.json (with ``skipped`` messages)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = Counter(e.sample_id for e in entries)
    duplicates = [sid for sid, count in ids.items() if count > 1]
    if duplicates:
        raise StoreError(f"duplicate sample ids (two files with one name?): {duplicates[:5]}")
    skipped: list[str] = []
    counts: Counter = Counter()
    handle, temporary = tempfile.mkstemp(dir=out, prefix=f".{SAMPLES_FILE}.", suffix=".tmp")
    os.close(handle)
    try:
        with pq.ParquetWriter(temporary, SCHEMA) as writer:
            batch: list[dict] = []
            for row in _rows(entries, plan.seed if plan else 0, skip_bad, skipped):
                counts[(row["category"], row["split"], row["label"])] += 1
                batch.append(row)
                if len(batch) == ROW_GROUP:
                    writer.write_table(pa.Table.from_pylist(batch, SCHEMA))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, SCHEMA))
        if not counts:
            raise StoreError(f"no usable images for {out} ({len(skipped)} skipped)")
        os.replace(temporary, out / SAMPLES_FILE)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    summary = {
        "format_version": STORE_FORMAT_VERSION,
        "source": source,
        "counts": {
            f"{c}/{s}/{'anomalous' if label else 'normal'}": n for (c, s, label), n in sorted(counts.items())
        },
        "contamination": plan.settings() if plan else None,
        "skipped": skipped,
        "warnings": scoring_warnings(counts),
    }
    if plan is not None:
        write_json(out / MANIFEST_FILE, {**plan.settings(), "injected": plan.injected})
    write_json(out / STORE_FILE, summary)
    return summary


def scoring_warnings(counts: Counter) -> list[str]:
    """What a category's test set lacks for scoring (evaluation then leaves those metrics out)."""
    warnings = []
    for category in sorted({c for c, _, _ in counts}):
        normal, anomalous = counts[(category, "test", 0)], counts[(category, "test", 1)]
        if not anomalous:
            warnings.append(
                f"{category}: the test set has no anomalous image ({normal} normal); AUROC, F1 and AUPRO "
                "cannot be computed (did the noise ratio move every anomaly into training? --overlap "
                "keeps them in the test set)"
            )
        elif not normal:
            warnings.append(f"{category}: the test set has no normal image; AUROC and F1 cannot be computed")
    return warnings


def read_manifest(out: Path, plan_settings: dict) -> dict[str, list[str]] | None:
    """The injected ids of an earlier prepare with the same settings, or None."""
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    same = all(manifest.get(key) == value for key, value in plan_settings.items())
    return manifest["injected"] if same else None


def check_store(store: Path) -> dict:
    store = Path(store)
    info_path = store / STORE_FILE
    if not (store / SAMPLES_FILE).is_file() or not info_path.is_file():
        raise StoreError(
            f"{store} is not a prepared store (no {SAMPLES_FILE} / {STORE_FILE}); run `cdd-ray prepare`"
        )
    info = json.loads(info_path.read_text())
    if info.get("format_version") != STORE_FORMAT_VERSION:
        raise StoreError(
            f"{info_path}: store format {info.get('format_version')} is not {STORE_FORMAT_VERSION}; "
            "prepare it again"
        )
    return info


def split_sample_ids(store: Path, split: str, category: str) -> list[str]:
    """Sorted sample ids of one split (and category), read from the Parquet file without images."""
    table = pq.read_table(Path(store) / SAMPLES_FILE, columns=["sample_id", "split", "category"])
    keep = pc.equal(table["split"], split)
    if category:
        keep = pc.and_(keep, pc.equal(table["category"], category))
    return sorted(table.filter(keep)["sample_id"].to_pylist())
