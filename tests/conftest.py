"""Shared fixtures: one local Ray per test session, tiny synthetic stores, tiny-model configs, and one
two-worker Ray Train run that several tests check (the uninterrupted reference of the fault test)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Before Ray starts: fast train reports, no dashboard, Ray's files out of the user's /tmp/ray.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ["CDD_RAY_DASHBOARD"] = "0"
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="cddray"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_BACKBONE = "test_resnet"


def read_progress(run_dir: Path) -> list[dict]:
    """The run's reports, one per step, in order (its ``progress.jsonl``)."""
    from cdd_ray.train.run import PROGRESS_FILE

    return [json.loads(line) for line in (Path(run_dir) / PROGRESS_FILE).read_text().splitlines()]


def count_target_passes(monkeypatch) -> list:
    """A list that grows by one each time ``CDDEngine.pseudo_normal`` runs in this process (the
    domain students computing a batch's pseudo-normal targets: what the target cache saves)."""
    from cdd_ray.train.engine import CDDEngine

    passes: list = []
    pseudo_normal = CDDEngine.pseudo_normal

    def counted(engine, *args, **kwargs):
        passes.append(1)
        return pseudo_normal(engine, *args, **kwargs)

    monkeypatch.setattr(CDDEngine, "pseudo_normal", counted)
    return passes


def pytest_collection_modifyitems(items):
    """Every test that uses the session's Ray is marked ``ray`` (``make test-fast`` leaves them out);
    tests that start a Ray of their own carry the mark themselves."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from cdd_ray.ray_session import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """Synthetic store: 2 categories, 32 px, 10% noise."""
    from cdd_ray.data.prepare import prepare
    from cdd_ray.data.synthetic import SyntheticConfig

    out = tmp_path_factory.mktemp("store")
    synthetic = SyntheticConfig(image_size=32, train_normal=20, test_normal=6, test_anomalous=8)
    prepare("synthetic", None, out, ["weave", "bolts"], noise_ratio=0.1, synthetic=synthetic)
    return out


def tiny_overrides(store: Path, storage: Path, **extra: object) -> list[str]:
    """Config overrides for a run that takes seconds on 2 CPUs."""
    values = {
        "data.path": store,
        "data.category": "weave",
        "data.image_size": 32,
        "teacher.backbone": TINY_BACKBONE,
        "teacher.pretrained": "false",
        "train.epochs": 1,
        "train.batch_size": 4,
        "ray.num_workers": 2,
        "ray.cpus_per_worker": 0.5,
        "ray.storage_path": storage,
        "eval.overlays": 1,
        "eval.report": "false",  # report.html is tested on its own and by the demo test
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


# One two-worker Ray Train run shared by the tests that need one (each fit costs tens of seconds):
# K = 3 on 2 workers (round robin), schedule alternate, 2 epochs, a checkpoint per epoch, traced.
# alternate: both stages every epoch, so (stage, step) names one epoch and checkpoints count epochs
TWO_WORKER_RUN = {
    "train.num_domains": 3,
    "train.schedule": "alternate",
    "train.epochs": 2,
    "train.checkpoint_every": 1,
    "ray.max_failures": 1,
}


@pytest.fixture(scope="session")
def two_worker_run(ray_session, tiny_store, tmp_path_factory):
    """(config, run_dir, checkpoint, metrics, trace_dir) of the uninterrupted reference run."""
    from cdd_ray.config import load_config
    from cdd_ray.train.run import train

    storage = tmp_path_factory.mktemp("reference-runs")
    trace = Path(tmp_path_factory.mktemp("reference-trace"))
    config = load_config(None, tiny_overrides(tiny_store, storage, name="uninterrupted", **TWO_WORKER_RUN))
    run_dir, checkpoint, metrics = train(config, trace_dir=str(trace))
    return config, run_dir, checkpoint, metrics, trace
