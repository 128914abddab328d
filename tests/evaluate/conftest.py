"""Run directories written by hand (no Ray, no training): a PatchCore run and an RD run."""

import json
from pathlib import Path

import pytest
import torch

from cdd_ray.config import config_to_dict, load_config
from cdd_ray.data.domains import DOMAINS_FILE, HOLDOUT
from cdd_ray.data.prepare import prepare
from cdd_ray.data.store import split_sample_ids
from cdd_ray.data.synthetic import SyntheticConfig
from cdd_ray.models.detector import distance_scale
from cdd_ray.models.distillation.student import Student, student_spec
from cdd_ray.train.checkpoint import BANK_FILE, save_global
from cdd_ray.train.fit import fit_memory_bank_detector
from tests.conftest import TINY_BACKBONE
from tests.models.test_teacher import random_teacher


def checkpoint_of(run: Path) -> Path:
    return next(run.glob("checkpoint_*"))


def run_config(store: Path, method: str, extra: tuple[str, ...] = ()):
    return load_config(
        None,
        [
            f"method={method}",
            f"data.path={store}",
            "data.category=weave",
            "data.image_size=32",
            f"teacher.backbone={TINY_BACKBONE}",
            "teacher.pretrained=false",
            *extra,
        ],
    )


def write_run(tmp_path: Path, method: str, extra: tuple[str, ...] = ()) -> Path:
    """``extra``: more dotted overrides (e.g. ``student.*``) the checkpoint's config records."""
    store = tmp_path / "store"
    if not store.exists():
        prepare("synthetic", None, store, ["weave"], synthetic=SyntheticConfig(image_size=32, train_normal=8))
    config = run_config(store, method, extra)
    run = tmp_path / f"run-{method}"
    checkpoint = run / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    teacher = random_teacher()
    if method == "distillation":
        student = Student(student_spec(teacher.channels, teacher.reductions, TINY_BACKBONE, config.student))
        scale = distance_scale(teacher, student, torch.rand(6, 3, 32, 32)).tolist()  # as a run's last step
        save_global(checkpoint, student, None, 1, 1, config_to_dict(config), extra={"distance_scale": scale})
    else:
        detector, _ = fit_memory_bank_detector(config, teacher, torch.rand(6, 3, 32, 32))
        save_global(checkpoint, None, None, 1, 1, config_to_dict(config))
        detector.bank.save(checkpoint / BANK_FILE)
    trained = split_sample_ids(store, "train", "weave")
    held_out, trained = trained[:3], trained[3:]
    assignment = {sid: HOLDOUT for sid in held_out} | {sid: 0 for sid in trained}
    (run / DOMAINS_FILE).write_text(json.dumps({"assignment": assignment, "holdout": held_out}))
    thresholds = {"image_threshold": 1.5, "pixel_threshold": 1.0}
    (run / "metrics.json").write_text(json.dumps({"per_category": {"weave": thresholds}}))
    return run


@pytest.fixture
def bank_run(tmp_path) -> Path:
    """A PatchCore run directory with a held-out slice and recorded thresholds."""
    return write_run(tmp_path, "patchcore")
