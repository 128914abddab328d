"""One two-worker Ray Train run shared by the tests that need one (each fit costs tens of seconds):
K = 3 on 2 workers (round robin), schedule alternate, 2 epochs, a checkpoint per epoch, traced."""

from pathlib import Path

import pytest

from cdd_ray.config import load_config
from tests.conftest import tiny_overrides

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
    from cdd_ray.train.run import train

    storage = tmp_path_factory.mktemp("reference-runs")
    trace = Path(tmp_path_factory.mktemp("reference-trace"))
    config = load_config(None, tiny_overrides(tiny_store, storage, name="uninterrupted", **TWO_WORKER_RUN))
    run_dir, checkpoint, metrics = train(config, trace_dir=str(trace))
    return config, run_dir, checkpoint, metrics, trace
