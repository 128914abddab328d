"""One seed, one result: the injected set, the domain partition and (on CPU) the metrics, end to end."""

import warnings

import numpy as np
import pyarrow.parquet as pq
import torch

from cdd_ray.data.domains import assign_domains
from cdd_ray.data.images import decode_images, decode_masks
from cdd_ray.data.prepare import prepare
from cdd_ray.data.store import SAMPLES_FILE
from cdd_ray.data.synthetic import SyntheticConfig
from cdd_ray.evaluate.metrics import compute_metrics
from cdd_ray.models.detector import DistillationDetector, score_in_batches
from cdd_ray.models.distillation.losses import ObjectiveConfig
from cdd_ray.models.distillation.student import student_spec
from cdd_ray.models.teacher import TeacherConfig, build_teacher
from cdd_ray.train.engine import CDDEngine, OptimConfig, fit_in_process
from tests.conftest import TINY_BACKBONE

SMALL = SyntheticConfig(image_size=32, train_normal=16, test_normal=6, test_anomalous=8)


def one_run(store, seed: int) -> tuple[list[str], np.ndarray, dict]:
    prepare("synthetic", None, store, ["granite"], noise_ratio=0.25, seed=seed, synthetic=SMALL)
    table = pq.read_table(store / SAMPLES_FILE).to_pylist()
    train = [r for r in table if r["split"] == "train"]
    test = [r for r in table if r["split"] == "test"]
    injected = sorted(r["sample_id"] for r in train if r["injected"])
    ids = [r["sample_id"] for r in train]
    domains = assign_domains(ids, "random", 2, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = build_teacher(TeacherConfig(backbone=TINY_BACKBONE, pretrained=False))
    spec = student_spec(teacher.channels, teacher.reductions, TINY_BACKBONE)
    engine = CDDEngine.create(teacher, spec, 2, ObjectiveConfig(), OptimConfig(), seed=seed)
    images = torch.from_numpy(decode_images([r["image"] for r in train], ids, 32))
    fit_in_process(engine, images, torch.as_tensor(domains), epochs=2, batch_size=4, seed=seed)
    test_ids = [r["sample_id"] for r in test]
    maps, scores = score_in_batches(
        DistillationDetector(teacher, engine.global_student),
        torch.from_numpy(decode_images([r["image"] for r in test], test_ids, 32)),
    )
    labels = np.asarray([r["label"] for r in test])
    masks = decode_masks([r["mask"] for r in test], test_ids, 32)
    return injected, domains, compute_metrics(scores.numpy(), labels, maps.numpy(), masks)


def test_same_seed_same_injected_set_partition_and_metrics(tmp_path):
    first = one_run(tmp_path / "a", seed=3)
    second = one_run(tmp_path / "b", seed=3)
    other = one_run(tmp_path / "c", seed=4)
    assert first[0] == second[0] and first[0] != other[0]
    assert np.array_equal(first[1], second[1]) and not np.array_equal(first[1], other[1])
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(first[2][key] - second[2][key]) <= 1e-6, key
    assert any(abs(first[2][k] - other[2][k]) > 1e-6 for k in ("image_auroc", "pixel_auroc", "aupro"))
