"""Where the per-worker loop runs: a Ray Train worker, or the calling process (``ray.num_workers=0``).

The loop (``cdd_ray.train.worker``) asks its session for its rank, device, datasets and last
checkpoint, and hands it each step's report. ``RayTrainSession`` forwards to ``ray.train`` inside a
TorchTrainer worker. ``InProcessSession`` runs the same loop in the process that calls it (the
driver, or a Tune trial): no Train controller, no worker processes to start, which is what makes
small runs and grids of small runs cheap. It keeps the same run-directory contract as Ray Train:
checkpoints in ``checkpoint_<timestamp>`` folders (the two newest kept), the same files in them,
``progress.jsonl`` through the same callbacks, and a resume from the newest checkpoint.

Example::

    metrics, checkpoint = run_in_process(train_loop, loop_config, datasets, run_dir, callbacks)
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import ray.data
import ray.train
import ray.train.torch
import torch

from cdd_ray.train.checkpoint import checkpoints_in

KEEP_CHECKPOINTS = 2


class RayTrainSession:
    """Inside a Ray Train worker: everything goes through ``ray.train``."""

    in_process = False

    def __init__(self):
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def dataset(self, name: str) -> ray.data.DataIterator:
        return ray.train.get_dataset_shard(name)

    @contextlib.contextmanager
    def last_checkpoint(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


class InProcessSession:
    """One rank in the calling process; checkpoints are copied into the run directory."""

    in_process = True

    def __init__(
        self,
        datasets: dict[str, ray.data.Dataset],
        run_dir: Path,
        device: torch.device,
        callbacks: list,
    ):
        self.rank, self.world_size = 0, 1
        self.device = device
        self.datasets = datasets
        self.run_dir = Path(run_dir)
        self.callbacks = callbacks
        self.last_metrics: dict = {}
        self.last_checkpoint_dir: Path | None = None

    def dataset(self, name: str) -> ray.data.DataIterator:
        return self.datasets[name].iterator()

    @contextlib.contextmanager
    def last_checkpoint(self) -> Iterator[Path | None]:
        kept = checkpoints_in(self.run_dir)
        yield kept[-1] if kept else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        saved = None
        if checkpoint_dir is not None:
            saved = self._keep(Path(checkpoint_dir))
            self.last_checkpoint_dir = saved
        self.last_metrics = dict(metrics)
        checkpoint = None if saved is None else ray.train.Checkpoint.from_directory(str(saved))
        for callback in self.callbacks:
            callback.after_report(None, [dict(metrics)], checkpoint)

    def _keep(self, source: Path) -> Path:
        """Copy under a temporary name, rename into place, then drop all but the newest two."""
        name = f"checkpoint_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S.%f')}"
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.run_dir))
        shutil.copytree(source, staging, dirs_exist_ok=True)
        target = self.run_dir / name
        staging.rename(target)
        for old in checkpoints_in(self.run_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return target


def run_in_process(
    loop: Callable[[dict, object], None],
    loop_config: dict,
    datasets: dict[str, ray.data.Dataset],
    run_dir: Path,
    device: torch.device,
    callbacks: list,
    threads: int,
) -> tuple[dict, Path | None]:
    """Run ``loop(loop_config, session)`` here with ``threads`` torch threads (what one Ray Train
    worker of ``ray.cpus_per_worker`` CPUs gets, so that both runners compute the same numbers);
    returns the last report and the newest checkpoint (the run's last one when the loop had
    nothing left to do)."""
    session = InProcessSession(datasets, run_dir, device, callbacks)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loop(loop_config, session)
    finally:
        torch.set_num_threads(before)
    kept = checkpoints_in(run_dir)
    return session.last_metrics, session.last_checkpoint_dir or (kept[-1] if kept else None)
