"""Readers that list the samples of a dataset on disk (MVTec AD, VisA, a generic folder, synthetic).

A reader returns ``SourceEntry`` rows without decoding pixels; the store writer decodes, checks and
encodes them. Layouts:

- MVTec AD: ``<root>/<category>/train/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``
- VisA: ``<root>/split_csv/1cls.csv`` (object, split, label, image, mask), or per class
  ``<root>/<class>/Data/Images/{Normal,Anomaly}`` + ``Data/Masks/Anomaly`` (then a seeded share of the
  normal images becomes the test set)
- folder: a normal dir, an abnormal dir, an optional mask dir (masks matched by file stem)
- synthetic: the embedded procedural benchmark

Example::

    entries = read_source("mvtec", Path("/data/mvtec"), categories=["bottle"])
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdd_ray.data.synthetic import CATEGORIES, SyntheticConfig, generate_category

SOURCE_KINDS = ("mvtec", "visa", "folder", "synthetic")


class SourceError(ValueError):
    """The source on disk does not have the expected layout; the message names the path."""


@dataclass
class SourceEntry:
    sample_id: str
    category: str
    split: str
    label: int
    defect_type: str
    source_path: str
    image_path: Path | None = None
    mask_path: Path | None = None
    pixels: np.ndarray | None = None
    mask: np.ndarray | None = None
    injected: bool = False
    augment_seed: int | None = None


def _hidden(path: Path) -> bool:
    """Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are never data."""
    return path.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    """Every visible file of an image folder (each is then read or refused by name); a visible
    sub-folder is refused rather than silently left out."""
    entries = sorted(p for p in folder.iterdir() if not _hidden(p))
    nested = [p for p in entries if p.is_dir()]
    if nested:
        raise SourceError(f"{nested[0]}: a folder inside the image folder {folder} is not read; move it out")
    return [p for p in entries if p.is_file()]


def _folders_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p))


def _mvtec_category(root: Path, category: str) -> list[SourceEntry]:
    base = root / category
    train_dir = base / "train" / "good"
    if not train_dir.is_dir():
        raise SourceError(f"{train_dir}: missing (MVTec layout needs <category>/train/good)")
    entries = [
        SourceEntry(f"{category}/train/good/{p.stem}", category, "train", 0, "good", str(p), image_path=p)
        for p in _images_in(train_dir)
    ]
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise SourceError(f"{test_dir}: missing (MVTec layout needs <category>/test)")
    for defect_dir in _folders_in(test_dir):
        defect = defect_dir.name
        for path in _images_in(defect_dir):
            mask = None
            if defect != "good":
                mask = base / "ground_truth" / defect / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise SourceError(f"mask missing for anomalous image {path}: expected {mask}")
            entries.append(
                SourceEntry(
                    f"{category}/test/{defect}/{path.stem}",
                    category,
                    "test",
                    int(defect != "good"),
                    defect,
                    str(path),
                    image_path=path,
                    mask_path=mask,
                )
            )
    return entries


def _visa_csv(root: Path, categories: list[str] | None) -> list[SourceEntry]:
    table = root / "split_csv" / "1cls.csv"
    entries = []
    with table.open(newline="") as handle:
        for row in csv.DictReader(handle):
            category = row["object"]
            if categories and category not in categories:
                continue
            label = int(row["label"].strip().lower() == "anomaly")
            image = root / row["image"]
            mask = root / row["mask"] if label and row.get("mask") else None
            if label and (mask is None or not mask.is_file()):
                raise SourceError(f"mask missing for anomalous image {image}: expected {mask} ({table})")
            split = row["split"].strip().lower()
            defect = "anomaly" if label else "good"
            entries.append(
                SourceEntry(
                    f"{category}/{split}/{defect}/{image.stem}",
                    category,
                    split,
                    label,
                    defect,
                    str(image),
                    image_path=image,
                    mask_path=mask,
                )
            )
    return entries


def _split_normals(paths: list[Path], test_fraction: float, seed: int) -> set[Path]:
    order = np.random.default_rng(seed).permutation(len(paths))
    return {paths[i] for i in order[: int(round(test_fraction * len(paths)))]}


def _visa_folders(
    root: Path, categories: list[str] | None, test_fraction: float, seed: int
) -> list[SourceEntry]:
    entries = []
    found = [d.name for d in _folders_in(root) if (d / "Data" / "Images").is_dir()]
    for category in categories or found:
        images = root / category / "Data" / "Images"
        if not images.is_dir():
            raise SourceError(f"{images}: missing (VisA layout needs <class>/Data/Images)")
        entries += _normal_abnormal(
            category,
            _images_in(images / "Normal"),
            _images_in(images / "Anomaly"),
            root / category / "Data" / "Masks" / "Anomaly",
            test_fraction,
            seed,
        )
    return entries


def _normal_abnormal(
    category: str,
    normals: list[Path],
    abnormals: list[Path],
    mask_dir: Path | None,
    test_fraction: float,
    seed: int,
) -> list[SourceEntry]:
    held_out = _split_normals(normals, test_fraction, seed)
    entries = []
    for path in normals:
        split = "test" if path in held_out else "train"
        entries.append(
            SourceEntry(
                f"{category}/{split}/good/{path.stem}", category, split, 0, "good", str(path), image_path=path
            )
        )
    for path in abnormals:
        mask = None
        if mask_dir is not None:
            candidates = [mask_dir / f"{path.stem}{suffix}" for suffix in (".png", "_mask.png")]
            mask = next((c for c in candidates if c.is_file()), None)
            if mask is None:
                raise SourceError(f"mask missing for anomalous image {path}: expected {candidates[0]}")
        entries.append(
            SourceEntry(
                f"{category}/test/anomaly/{path.stem}",
                category,
                "test",
                1,
                "anomaly",
                str(path),
                image_path=path,
                mask_path=mask,
            )
        )
    return entries


def _synthetic(config: SyntheticConfig, categories: list[str] | None) -> list[SourceEntry]:
    entries = []
    for category in categories or CATEGORIES:
        for sample in generate_category(category, config):
            sample_id = f"{category}/{sample.split}/{sample.defect_type}/{sample.name}"
            entries.append(
                SourceEntry(
                    sample_id,
                    category,
                    sample.split,
                    sample.label,
                    sample.defect_type,
                    f"synthetic:{sample_id}",
                    pixels=sample.image,
                    mask=sample.mask,
                )
            )
    return entries


def read_source(
    kind: str,
    root: Path | None = None,
    categories: list[str] | None = None,
    abnormal_dir: Path | None = None,
    mask_dir: Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    synthetic: SyntheticConfig | None = None,
) -> list[SourceEntry]:
    if kind == "synthetic":
        return _synthetic(synthetic or SyntheticConfig(seed=seed), categories)
    if root is None or not Path(root).is_dir():
        raise SourceError(f"source folder {root} does not exist")
    root = Path(root)
    expected = list(categories or [])  # every category asked for, or found on disk, needs training images
    if kind == "mvtec":
        found = [d.name for d in _folders_in(root) if (d / "train").is_dir()]
        expected = expected or found
        entries = [e for c in expected for e in _mvtec_category(root, c)]
    elif kind == "visa":
        if (root / "split_csv" / "1cls.csv").is_file():
            entries = _visa_csv(root, categories)
        else:
            entries = _visa_folders(root, categories, test_fraction, seed)
    elif kind == "folder":
        if abnormal_dir is None or not Path(abnormal_dir).is_dir():
            raise SourceError(f"folder source needs an abnormal dir; {abnormal_dir} does not exist")
        category = (categories or [root.name])[0]
        entries = _normal_abnormal(
            category,
            _images_in(root),
            _images_in(Path(abnormal_dir)),
            Path(mask_dir) if mask_dir else None,
            test_fraction,
            seed,
        )
    else:
        raise SourceError(f"unknown source kind {kind!r}; choose from {SOURCE_KINDS}")
    if not entries:
        raise SourceError(f"{root}: no images found for categories {categories or 'any'}")
    for category in sorted(set(expected) | {e.category for e in entries}):
        if not any(e.category == category and e.split == "train" for e in entries):
            raise SourceError(f"{root}: category {category!r} has no training images")
    return entries
