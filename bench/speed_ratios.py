"""Speed ratios measured side by side on this machine (synthetic weave, noise 0.1, 128 px,
offline-pretrained tf_efficientnet_lite0 teacher):

1. Teacher feature cache: in-process training images/s with and without ``train.teacher_cache``
   (RD and CDD K=2), alternating rounds; 1b. the pseudo-normal target cache of CDD K=2 under the
   ``sequential`` schedule, on and off, alternating rounds.
2. Concurrency: CDD K=2 on 2 Ray Train workers (one domain student each, DDP global student) against
   the same work on 1 worker; wall time of the training epochs (sum of epoch_time_s) and of the whole
   fit (start-up included).
3. Inference: images/s of the evaluate path (Ray Data actor scoring the test set, decode included)
   and of in-process scoring.

Run: .venv/bin/python bench/speed_ratios.py [--epochs 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("CDD_RAY_DASHBOARD", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cdd_ray.config import load_config  # noqa: E402
from cdd_ray.data.prepare import prepare  # noqa: E402
from cdd_ray.models.detector import DistillationDetector, score_in_batches  # noqa: E402
from cdd_ray.models.distillation.losses import ObjectiveConfig  # noqa: E402
from cdd_ray.models.distillation.student import student_spec  # noqa: E402
from cdd_ray.models.teacher import TeacherConfig, build_teacher  # noqa: E402
from cdd_ray.train.engine import CDDEngine, OptimConfig, fit_in_process  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from quality_grid import load  # noqa: E402


def cache_ratio(store: Path, epochs: int, rounds: int) -> None:
    teacher = build_teacher(TeacherConfig())
    train = load(store, "weave", "train", 128)
    images = train["images"]
    spec = student_spec(teacher.channels, teacher.reductions, "tf_efficientnet_lite0")
    print(
        f"\n1. teacher cache, {len(images)} images, {epochs} epochs, batch 16, "
        f"torch threads {torch.get_num_threads()}"
    )
    print("| K | cache | images/s (median of rounds) | rounds |\n|---:|---|---:|---|")
    for k in (1, 2):
        domains = torch.as_tensor(np.arange(len(images)) % k)
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for cache in (False, True):
                engine = CDDEngine.create(teacher, spec, k, ObjectiveConfig(), OptimConfig(), seed=0)
                started = time.perf_counter()
                fit_in_process(engine, images, domains, epochs, 16, seed=0, teacher_cache=cache)
                rates[cache].append(epochs * len(images) / (time.perf_counter() - started))
        for cache in (False, True):
            values = ", ".join(f"{v:.1f}" for v in rates[cache])
            print(f"| {k} | {'on' if cache else 'off'} | {statistics.median(rates[cache]):.1f} | {values} |")
        print(
            f"K={k}: cache speed-up {statistics.median(rates[True]) / statistics.median(rates[False]):.2f}x"
        )


def target_cache_ratio(store: Path, epochs: int, rounds: int) -> None:
    """CDD K=2, ``sequential`` (the shipped schedule), teacher cache on: the pseudo-normal targets
    computed by the frozen domain students at every aggregation step, or once (``TargetCache``)."""
    teacher = build_teacher(TeacherConfig())
    images = load(store, "weave", "train", 128)["images"]
    spec = student_spec(teacher.channels, teacher.reductions, "tf_efficientnet_lite0")
    domains = torch.as_tensor(np.arange(len(images)) % 2)
    print(f"\n1b. target cache, CDD K=2 sequential, {len(images)} images, {epochs} epochs of each stage")
    print("| targets | images/s (median of rounds) | rounds |\n|---|---:|---|")
    rates: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(rounds):
        for cached in (False, True) if round_ % 2 == 0 else (True, False):  # neither always goes first
            engine = CDDEngine.create(teacher, spec, 2, ObjectiveConfig(), OptimConfig(), seed=0)
            started = time.perf_counter()
            fit_in_process(
                engine, images, domains, epochs, 16, 0, True, schedule="sequential", cache_targets=cached
            )
            rates[cached].append(epochs * len(images) / (time.perf_counter() - started))
    for cached in (False, True):
        values = ", ".join(f"{v:.1f}" for v in rates[cached])
        label = "cached" if cached else "every step"
        print(f"| {label} | {statistics.median(rates[cached]):.1f} | {values} |")
    print(f"target cache speed-up {statistics.median(rates[True]) / statistics.median(rates[False]):.2f}x")


def concurrency_ratio(store: Path, work: Path, epochs: int) -> None:
    from cdd_ray.ray_session import ensure_ray
    from cdd_ray.train.run import PROGRESS_FILE, evaluate, train

    ensure_ray(num_cpus=2)
    print(f"\n2. concurrency: CDD K=2, {epochs} epochs, 1 CPU per worker (Ray Train)")
    print("| workers | training epochs, s | whole fit, s | evaluate images/s |\n|---:|---:|---:|---:|")
    epoch_seconds = {}
    for workers in (2, 1):
        overrides = [
            f"data.path={store}",
            "data.category=weave",
            "train.num_domains=2",
            f"train.epochs={epochs}",
            f"ray.num_workers={workers}",
            "ray.cpus_per_worker=1",
            f"ray.storage_path={work / 'runs'}",
            f"name=concurrency-w{workers}",
            "eval.overlays=0",
        ]
        config = load_config(None, overrides)
        started = time.perf_counter()
        run_dir, checkpoint, _ = train(config)
        fit_seconds = time.perf_counter() - started
        reports = [json.loads(line) for line in (run_dir / PROGRESS_FILE).read_text().splitlines()]
        epoch_seconds[workers] = sum(r["epoch_time_s"] for r in reports)
        started = time.perf_counter()
        metrics = evaluate(config, run_dir, checkpoint)
        scored = metrics["num_test_images"]
        eval_rate = scored / (time.perf_counter() - started)
        print(f"| {workers} | {epoch_seconds[workers]:.1f} | {fit_seconds:.1f} | {eval_rate:.1f} |")
    print(f"1 worker / 2 workers, training epochs: {epoch_seconds[1] / epoch_seconds[2]:.2f}x")


def inference_in_process(store: Path) -> None:
    teacher = build_teacher(TeacherConfig())
    spec = student_spec(teacher.channels, teacher.reductions, "tf_efficientnet_lite0")
    student = CDDEngine.create(teacher, spec, 1, ObjectiveConfig(), OptimConfig()).global_student
    test = load(store, "weave", "test", 128)["images"]
    detector = DistillationDetector(teacher, student)
    score_in_batches(detector, test[:16])
    started = time.perf_counter()
    score_in_batches(detector, test)
    rate = len(test) / (time.perf_counter() - started)
    print(
        f"\n3. in-process scoring (teacher + student + anomaly map), {len(test)} images: {rate:.1f} images/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cddspeed"))
    prepare("synthetic", None, work / "store", ["weave"], noise_ratio=0.1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    cache_ratio(work / "store", args.epochs, args.rounds)
    target_cache_ratio(work / "store", args.epochs, args.rounds)
    inference_in_process(work / "store")
    if not args.skip_ray:
        concurrency_ratio(work / "store", work, args.epochs)


if __name__ == "__main__":
    main()
