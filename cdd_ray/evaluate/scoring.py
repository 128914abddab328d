"""Scoring a run's test set: its detector from a checkpoint, the test images from the store. No Ray.

The train workers score their shard of the test set at the end of a run with the same detector and
the same arrays; ``cdd-ray evaluate`` and ``predict`` use this module in one process.

Example::

    detector, config = load_detector(checkpoint_dir, torch.device("cpu"))
    test = read_split_arrays(store, "test", "weave", config.data.image_size)
    results = score_arrays(detector, test)      # sample_id, category, label, score, map, mask
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from cdd_ray.config import Config, config_from_dict
from cdd_ray.data.batches import decode_batch
from cdd_ray.data.domains import DOMAINS_FILE
from cdd_ray.data.parquet_rows import ParquetRows
from cdd_ray.data.sharding import trained_ids
from cdd_ray.data.store import SAMPLES_FILE, StoreError, check_store, write_json
from cdd_ray.data.tensors import to_float
from cdd_ray.evaluate.html_report import write_run_report
from cdd_ray.evaluate.report import summarize, write_overlays
from cdd_ray.models.detector import (
    PatchCoreDetector,
    distance_statistics,
    distillation_detector,
    score_in_batches,
    teacher_features,
)
from cdd_ray.models.distillation.student import Student, student_spec
from cdd_ray.models.patchcore.memory_bank import MemoryBank
from cdd_ray.models.teacher import build_teacher
from cdd_ray.train.checkpoint import BANK_FILE, CheckpointError, load_global

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
EVAL_COLUMNS = ["sample_id", "category", "split", "label", "defect_type", "image", "mask"]


def build_detector(config: Config, state: dict, checkpoint_dir: Path, device: torch.device) -> nn.Module:
    """The detector a checkpoint holds: teacher + evaluation student, or teacher + memory bank."""
    teacher = build_teacher(config.teacher)
    if config.method == "distillation":
        student = Student(
            student_spec(teacher.channels, teacher.reductions, config.teacher.backbone, config.student)
        )
        student.load_state_dict(state.get("evaluation_student") or state["global_student"])
        scale = state.get("distance_scale")
        if config.eval.distance == "cos_l2" and scale is None:
            teacher, student = teacher.to(device), student.to(device)
            scale = scale_from_training_rows(config, Path(checkpoint_dir), teacher, student, state)
        scale = None if scale is None else torch.tensor(scale, dtype=torch.float32)
        detector: nn.Module = distillation_detector(teacher, student, config.eval, scale)
    else:
        path = Path(checkpoint_dir) / BANK_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: memory bank missing from a {config.method} checkpoint")
        detector = PatchCoreDetector(teacher, MemoryBank.load(path), config.memory_bank, config.eval.sigma)
    return detector.to(device).eval()


def scale_from_training_rows(
    config: Config, checkpoint_dir: Path, teacher: nn.Module, student: nn.Module, state: dict
) -> list[list[float]]:
    """The ``cos_l2`` scale (L, 2) of a checkpoint written before its run's last step (only the last
    step stores it): the same means, over the run's trained (not held-out) rows, read from its
    store in one pass, on the teacher's device. The rows come from the checkpoint's own domain
    manifest, or, for a checkpoint without one, from ``domains.json`` beside it. Warns that it was
    computed.

    Raises CheckpointError naming the checkpoint when no manifest can be read or the store lacks a
    trained row."""
    where = (
        f"{checkpoint_dir} (step {state.get('steps_done')}) has no distance scale for eval.distance=cos_l2"
    )
    source = f"{checkpoint_dir / 'global.pt'}'s domain manifest"
    manifest = state.get("domain_manifest")
    if manifest is None:
        path = checkpoint_dir.parent / DOMAINS_FILE
        source = str(path)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"{where}, and its run's training rows cannot be read from {path} ({error}): finish the "
                "run by training it again under the same name, which resumes it and writes the scale"
            ) from error
    if not isinstance(manifest.get("assignment"), dict):
        raise CheckpointError(f"{where}, and {source} has no 'assignment' of training rows")
    ids = trained_ids(manifest["assignment"])
    store = Path(config.data.path)

    def batches():
        rows = ParquetRows(
            store, config.data.category or "", config.data.image_size, manifest["assignment"], frozenset(ids)
        )
        for block in rows(frozenset(ids)):
            yield from to_float(torch.from_numpy(block["image"])).split(config.ray.eval_batch_size)

    device = next(iter(teacher.parameters())).device
    try:
        features = teacher_features(teacher, batches())
        scale = distance_statistics(student, features, len(teacher.channels), device).scale()
    except (StoreError, ValueError) as error:  # a row missing from the store; none; a degenerate student
        raise CheckpointError(f"{where}; rebuilding it from {source}: {error}") from error
    warnings.warn(
        f"{where}: computed it from the {len(ids)} images the run trained on ({source})", stacklevel=2
    )
    return scale.tolist()


def load_detector(checkpoint_dir: Path, device: torch.device) -> tuple[nn.Module, Config]:
    """The checkpoint's detector and its run's config. A checkpoint written before a scoring key
    existed is scored as its run was: before ``eval.distance`` and ``eval.top_fraction``, cosine
    distance and map maximum; before ``eval.test_time_augment``, each image once."""
    state = load_global(Path(checkpoint_dir))
    values = state["config"]
    scoring = values.get("eval", {})
    if "distance" not in scoring:
        scoring = {**scoring, "distance": "cos", "top_fraction": 0.0}
    if "test_time_augment" not in scoring:
        scoring = {**scoring, "test_time_augment": "none"}
    values = {**values, "eval": scoring}
    config = config_from_dict(values)
    return build_detector(config, state, Path(checkpoint_dir), device), config


def read_split_arrays(
    store: Path, split: str, category: str, image_size: int, sample_ids: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Decoded rows of one split (and category, optionally only ``sample_ids``), as ``read_split``
    gives them through Ray Data: images float32 (N, 3, S, S) in [0, 1], masks uint8 (N, S, S)."""
    check_store(store)
    table = pq.read_table(Path(store) / SAMPLES_FILE, columns=EVAL_COLUMNS)
    if sample_ids is not None:
        table = table.filter(pc.is_in(table["sample_id"], value_set=pa.array(sample_ids, pa.string())))
    return decode_batch(table, split, category, image_size, evaluation=True)


def score_arrays(
    detector: nn.Module, data: dict[str, np.ndarray], batch_size: int = 16
) -> dict[str, np.ndarray]:
    """Maps and scores of ``data['image']``, with the test set's labels, masks and ids (no images)."""
    maps, scores = score_in_batches(detector, torch.from_numpy(data["image"]), batch_size)
    results = {key: value for key, value in data.items() if key != "image"}
    results["map"] = maps.numpy()
    results["score"] = scores.numpy()
    return results


def images_by_id(store: Path, category: str, image_size: int, sample_ids: list[str]) -> np.ndarray:
    """Decoded test images (n, 3, S, S) of ``sample_ids``, in that order."""
    data = read_split_arrays(store, "test", category, image_size, sorted(set(sample_ids)))
    position = {str(sid): i for i, sid in enumerate(data["sample_id"])}
    return data["image"][[position[sid] for sid in sample_ids]]


def write_evaluation(run_dir: Path, config: Config, results: dict[str, np.ndarray], checkpoint: str) -> dict:
    """metrics.json, report.html and overlays/ of a scored test set; returns the metrics."""
    curves: dict = {}
    metrics = summarize(results, config.eval.fpr_limit, curves)
    metrics["checkpoint"] = checkpoint
    write_json(Path(run_dir) / METRICS_FILE, metrics)
    store = Path(config.data.path)

    def images_of(ids: list[str]) -> np.ndarray:
        return images_by_id(store, config.data.category, config.data.image_size, ids)

    if config.eval.report:
        title = Path(run_dir).name
        write_run_report(
            Path(run_dir) / REPORT_FILE, results, metrics, title, config.eval.fpr_limit, images_of, curves
        )
    # a fresh folder swapped in whole: no overlay of an earlier evaluation stays beside the new ones
    overlays = Path(run_dir) / "overlays"
    staging = Path(tempfile.mkdtemp(prefix=".overlays.", dir=run_dir))
    write_overlays(staging, results, config.eval.overlays, images_of)
    if overlays.exists():
        retired = overlays.rename(Path(tempfile.mkdtemp(prefix=".retired.", dir=run_dir)) / "overlays")
        staging.rename(overlays)
        shutil.rmtree(retired.parent)
    else:
        staging.rename(overlays)
    return metrics
