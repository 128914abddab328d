"""``cdd-ray predict``: scores, decisions, region masks and anomaly maps for new images, in-process.

Inputs may be files, folders (every visible image file inside, recursively) and glob patterns.
Each output is written under ``out`` at the input's path relative to the inputs' common folder, so
two inputs with one file name (``cam_left/0001.png``, ``cam_right/0001.png``) never share a map.

Decisions need a threshold (``Threshold``), from one of:

- ``evaluated``: the F1-max thresholds that evaluation recorded for the run's category in
  metrics.json (image score for the decision, pixel score for the region mask);
- a value: one threshold in score units for both the decision and the region;
- ``quantile:q``: no labels needed, the q-quantile of the scores of the run's held-out normal slice
  (``data.holdout_fraction``; pixels for the region mask, images for the decision).

Outputs: ``<name>_map.png`` (heat map), ``<name>_mask.png`` (the predicted region),
``predictions.json`` and ``predictions.csv`` (image, score, anomalous, threshold, map, mask).

Example::

    rows = predict_images(run_dir, checkpoint_dir, [Path("parts/")], Path("out"), "evaluated")
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdd_ray.config import Config
from cdd_ray.data.domains import DOMAINS_FILE
from cdd_ray.data.images import IMAGE_SUFFIXES, encode_mask, read_image, resize_image
from cdd_ray.data.store import write_atomic, write_json
from cdd_ray.evaluate.report import save_map_png
from cdd_ray.evaluate.scoring import METRICS_FILE, load_detector, read_split_arrays
from cdd_ray.models.detector import score_in_batches


class ThresholdError(ValueError):
    """No threshold can be had the way asked; the message says what is missing and what to pass."""


@dataclass
class Threshold:
    image: float
    pixel: float
    source: str


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given; folders as every visible image file below them; globs expanded. Each file
    once, in the order found. Raises FileNotFoundError naming an input that matches nothing."""
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        if item.is_dir():
            matches = sorted(
                p
                for p in item.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
        elif item.is_file():
            matches = [item]
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
        if not matches:
            raise FileNotFoundError(f"{item}: no image files found there")
        found += matches
    return list(dict.fromkeys(p.resolve() for p in found))


def output_names(paths: list[Path]) -> list[Path]:
    """Each input's path relative to the common folder of all inputs, without its suffix."""
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.parent.relative_to(root) / p.stem for p in paths]


def evaluated_threshold(run_dir: Path, config: Config) -> Threshold:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ThresholdError(
            f"{path} does not exist (the run was not evaluated): pass --threshold or --quantile"
        )
    per_category = json.loads(path.read_text()).get("per_category", {})
    category = config.data.category or (next(iter(per_category)) if len(per_category) == 1 else "")
    values = per_category.get(category, {})
    if "image_threshold" not in values:
        raise ThresholdError(
            f"{path} has no F1-max threshold for category {category or '(several categories)'}: "
            "pass --threshold or --quantile"
        )
    return Threshold(
        values["image_threshold"], values.get("pixel_threshold", values["image_threshold"]), "evaluated"
    )


def quantile_threshold(
    run_dir: Path, config: Config, detector: torch.nn.Module, quantile: float
) -> Threshold:
    """The ``quantile`` of the held-out (never trained on) training images' scores: label-free."""
    if not 0 < quantile < 1:
        raise ThresholdError(f"--quantile must lie in (0, 1), got {quantile}")
    manifest_file = Path(run_dir) / DOMAINS_FILE
    held_out = json.loads(manifest_file.read_text()).get("holdout", []) if manifest_file.is_file() else []
    if not held_out:
        raise ThresholdError(
            f"the run {run_dir} held no images out (data.holdout_fraction=0): a quantile threshold needs "
            "them; pass --threshold, or train with data.holdout_fraction > 0"
        )
    data = read_split_arrays(
        Path(config.data.path), "train", config.data.category, config.data.image_size, held_out
    )
    maps, scores = score_in_batches(detector, torch.from_numpy(data["image"]))
    image = float(np.quantile(scores.numpy(), quantile))
    pixel = float(np.quantile(maps.numpy(), quantile))
    return Threshold(image, pixel, f"quantile {quantile:g} of {len(held_out)} held-out images")


def resolve_threshold(run_dir: Path, config: Config, detector, how: str | float | None) -> Threshold | None:
    if how is None:
        return None
    if isinstance(how, float):
        return Threshold(how, how, "given")
    if how == "evaluated":
        return evaluated_threshold(run_dir, config)
    if how.startswith("quantile:"):
        return quantile_threshold(run_dir, config, detector, float(how.split(":", 1)[1]))
    raise ThresholdError(f"threshold {how!r}: use evaluated, a number, or quantile:Q")


def predict_images(
    run_dir: Path,
    checkpoint_dir: Path,
    images: list[Path],
    out: Path,
    threshold: str | float | None = "evaluated",
) -> list[dict]:
    """Score ``images`` (files, folders, globs) and decide with ``threshold`` (None: scores only)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = expand_inputs([Path(p) for p in images])
    detector, config = load_detector(checkpoint_dir, device)
    decision = resolve_threshold(run_dir, config, detector, threshold)
    size = config.data.image_size
    pixels = np.stack([resize_image(read_image(p), size).transpose(2, 0, 1) / 255.0 for p in paths])
    maps, scores = score_in_batches(detector, torch.from_numpy(pixels.astype(np.float32)))
    out = Path(out)
    vmax = float(maps.max())
    rows = []
    for path, name, anomaly_map, score in zip(
        paths, output_names(paths), maps.numpy(), scores.tolist(), strict=True
    ):
        map_path = out / f"{name}_map.png"
        save_map_png(map_path, anomaly_map, vmax)
        row = {"image": str(path), "score": score, "anomalous": None, "threshold": None, "map": str(map_path)}
        row["mask"] = None
        if decision is not None:
            mask_path = out / f"{name}_mask.png"
            write_atomic(mask_path, encode_mask(anomaly_map >= decision.pixel))
            row |= {"anomalous": score >= decision.image, "threshold": decision.image, "mask": str(mask_path)}
        rows.append(row)
    write_json(
        out / "predictions.json", {"threshold": None if decision is None else vars(decision), "images": rows}
    )
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "predictions.csv", table.getvalue())
    return rows
