"""Scoring a test set through Ray Data: an actor pool holds the teacher and the global student.

Example::

    results = score_test_set(config, checkpoint_dir)  # arrays: sample_id, label, score, map, mask, ...
    metrics = summarize(results, config.eval.fpr_limit)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
import torch

from cdd_ray.config import Config, config_from_dict
from cdd_ray.data.ray_data import read_split
from cdd_ray.evaluate.scoring import score_batch
from cdd_ray.models.student import Student, student_spec
from cdd_ray.models.teacher import Teacher, TeacherConfig, build_teacher
from cdd_ray.train.checkpoint import load_global


def load_scorer(checkpoint_dir: Path, device: torch.device) -> tuple[Teacher, Student, Config]:
    """Teacher and global student of a checkpoint, ready to score (eval mode, on ``device``)."""
    state = load_global(Path(checkpoint_dir))
    config = config_from_dict(state["config"])
    teacher = build_teacher(TeacherConfig(**vars(config.teacher))).to(device)
    student = Student(student_spec(teacher.channels, teacher.reductions, config.teacher.backbone))
    student.load_state_dict(state["global_student"])
    return teacher, student.to(device).eval(), config


class ScoreBatch:
    """Actor: anomaly maps and scores for batches of decoded test images."""

    def __init__(self, checkpoint_dir: str, sigma: float):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher, self.student, _ = load_scorer(Path(checkpoint_dir), self.device)
        self.sigma = sigma

    def __call__(self, batch: dict) -> dict:
        images = torch.from_numpy(batch["image"]).to(self.device)
        maps, scores = score_batch(self.teacher, self.student, images, self.sigma)
        batch["map"] = maps.float().cpu().numpy()
        batch["score"] = scores.float().cpu().numpy()
        return batch


def score_test_set(config: Config, checkpoint_dir: Path, use_gpu: bool = False) -> dict[str, np.ndarray]:
    # Decode first: an actor holding a CPU while read tasks wait for one deadlocks when several
    # trials evaluate at once on a small machine.
    dataset = read_split(
        Path(config.data.path), "test", config.data.category, config.data.image_size
    ).materialize()
    scored = dataset.map_batches(
        ScoreBatch,
        fn_constructor_kwargs={"checkpoint_dir": str(checkpoint_dir), "sigma": config.eval.sigma},
        batch_size=config.ray.eval_batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_gpus=1 if use_gpu else 0,
    )
    parts = [b for b in scored.iter_batches(batch_size=None, batch_format="numpy") if len(b["sample_id"])]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
