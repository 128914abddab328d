"""Plain RD on the clean synthetic benchmark, per category, in-process (no Ray), and the share of
injected anomalies per domain under each partition strategy on the noisy set.

The first table answers "is the benchmark informative?" (a category where clean RD already reaches
image AUROC >= 0.99 tells nothing); the second shows which strategy lowers the anomaly share of most
domains (the paper's premise). Teacher: offline-pretrained tf_efficientnet_lite0.

Run: .venv/bin/python bench/synthetic_quality.py [--epochs 30] [--size 128] [--noise 0.1]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from cdd_ray.data.domains import assign_domains, domain_report
from cdd_ray.data.images import decode_images, decode_masks
from cdd_ray.data.prepare import prepare
from cdd_ray.data.store import SAMPLES_FILE
from cdd_ray.data.synthetic import CATEGORIES
from cdd_ray.evaluate.metrics import compute_metrics
from cdd_ray.models.detector import DistillationDetector, score_in_batches
from cdd_ray.models.distillation.losses import ObjectiveConfig
from cdd_ray.models.distillation.student import student_spec
from cdd_ray.models.teacher import TeacherConfig, build_teacher, pooled_embedding
from cdd_ray.train.engine import CDDEngine, OptimConfig, fit_in_process


def load(store: Path, category: str, split: str, size: int) -> dict:
    table = pq.read_table(store / SAMPLES_FILE, filters=[("category", "=", category), ("split", "=", split)])
    ids = table["sample_id"].to_pylist()
    if not ids:
        raise ValueError(f"{store / SAMPLES_FILE} has no {split} images of category {category!r}")
    return {
        "ids": ids,
        "images": torch.from_numpy(decode_images(table["image"].to_pylist(), ids, size)),
        "labels": np.asarray(table["label"].to_pylist()),
        "masks": decode_masks(table["mask"].to_pylist(), ids, size),
        "injected": np.asarray(table["injected"].to_pylist()),
        "defect_types": np.asarray(table["defect_type"].to_pylist()),
    }


def rd_clean(store: Path, category: str, teacher, epochs: int, size: int) -> dict:
    train, test = load(store, category, "train", size), load(store, category, "test", size)
    spec = student_spec(teacher.channels, teacher.reductions, "tf_efficientnet_lite0")
    engine = CDDEngine.create(teacher, spec, 1, ObjectiveConfig(), OptimConfig(), seed=0)
    domains = torch.zeros(len(train["ids"]), dtype=torch.long)
    fit_in_process(engine, train["images"], domains, epochs, batch_size=16, seed=0, teacher_cache=True)
    maps, scores = score_in_batches(DistillationDetector(teacher, engine.global_student), test["images"])
    return compute_metrics(scores.numpy(), test["labels"], maps.numpy(), test["masks"])


def partition_shares(store: Path, category: str, teacher, size: int, k: int) -> dict[str, list[float]]:
    train = load(store, category, "train", size)
    with torch.no_grad():
        vectors = pooled_embedding(teacher(train["images"])).numpy()
    shares = {}
    for strategy in ("random", "cluster", "outlier"):
        domains = assign_domains(train["ids"], strategy, k, seed=0, embeddings=vectors)
        shares[strategy] = [r["injected_share"] for r in domain_report(domains, train["injected"], k)]
    return shares


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = build_teacher(TeacherConfig())
    work = Path(tempfile.mkdtemp(prefix="cddbench"))
    prepare("synthetic", None, work / "clean", noise_ratio=0.0)
    prepare("synthetic", None, work / "noisy", noise_ratio=args.noise)
    print(f"machine: {platform.machine()}, torch threads {torch.get_num_threads()}, epochs {args.epochs}")
    print("\n| category | RD clean image AUROC | pixel AUROC | AUPRO | seconds |\n|---|---:|---:|---:|---:|")
    for category in CATEGORIES:
        started = time.perf_counter()
        m = rd_clean(work / "clean", category, teacher, args.epochs, args.size)
        elapsed = time.perf_counter() - started
        values = " | ".join(f"{m[key]:.3f}" for key in ("image_auroc", "pixel_auroc", "aupro"))
        print(f"| {category} | {values} | {elapsed:.0f} |")
    for k in (2, 3):
        print(f"\nnoise {args.noise}, K={k}: injected share per domain (whole-set share in brackets)\n")
        print("| category | random | cluster | outlier |\n|---|---|---|---|")
        for category in CATEGORIES:
            shares = partition_shares(work / "noisy", category, teacher, args.size, k)
            overall = float(load(work / "noisy", category, "train", 8)["injected"].mean())
            cells = [" / ".join(f"{s:.2f}" for s in shares[name]) for name in shares]
            print(f"| {category} ({overall:.2f}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
