"""Writers of tiny dataset trees in the MVTec AD, VisA and plain-folder layouts (no downloads)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def square_mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[4:9, 4:9] = 255
    return mask


def mvtec_tree(root: Path, category: str = "widget", train: int = 6, per_defect: int = 3) -> Path:
    base = root / category
    for i in range(train):
        write_png(base / "train" / "good" / f"{i:03d}.png", rgb(i))
    for i in range(2):
        write_png(base / "test" / "good" / f"{i:03d}.png", rgb(100 + i))
    for d, defect in enumerate(("crack", "hole")):
        for i in range(per_defect):
            write_png(base / "test" / defect / f"{i:03d}.png", rgb(200 + 10 * d + i))
            write_png(base / "ground_truth" / defect / f"{i:03d}_mask.png", square_mask())
    return root


def visa_csv_tree(root: Path, category: str = "candle") -> Path:
    rows = []
    for i in range(5):
        path = write_png(root / category / "Data" / "Images" / "Normal" / f"{i:04d}.png", rgb(i))
        rows.append([category, "train" if i < 4 else "test", "normal", str(path.relative_to(root)), ""])
    for i in range(3):
        image = write_png(root / category / "Data" / "Images" / "Anomaly" / f"{i:03d}.png", rgb(50 + i))
        mask = write_png(root / category / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", square_mask())
        rows.append([category, "test", "anomaly", str(image.relative_to(root)), str(mask.relative_to(root))])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root
