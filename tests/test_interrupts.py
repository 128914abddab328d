"""Drivers killed or interrupted from outside: the same command (or --resume) finishes the work.

The commands run as subprocesses attached to the session's Ray cluster (RAY_ADDRESS), as a user's
`cdd-ray` would attach to a cluster; killing the driver takes its Train controller and workers along.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cdd_ray.train.checkpoint import load_global
from cdd_ray.train.run import FAULT_ENV, PROGRESS_FILE, latest_checkpoint
from tests.conftest import tiny_overrides


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdd_ray.cli", *args]


def attached_env(ray_session, **extra: str) -> dict:
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, **extra}


def wait_for(predicate, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the command ended (code {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def epochs_reported(run_dir: Path) -> list[int]:
    path = run_dir / PROGRESS_FILE
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_killed_train_driver_then_the_same_command_resumes(ray_session, tiny_store, tmp_path):
    storage = tmp_path / "runs"
    overrides = {"name": "killed", "train.epochs": 3, "train.num_domains": 2, "eval.score_test": "false"}
    command = cli("train", *tiny_overrides(tiny_store, storage, **overrides))
    marker = tmp_path / "stalled"
    # Rank 0 stalls at the start of epoch 2's aggregation, after epoch 1's checkpoint: a driver killed
    # there dies mid-epoch with work done since the last checkpoint.
    stall = {"action": "stall", "seconds": 300, "rank": 0, "step": 1, "batch": 0, "marker": str(marker)}
    env = attached_env(ray_session, **{FAULT_ENV: json.dumps(stall)})
    run_dir = storage / "killed"
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as first:
        wait_for(
            lambda: marker.exists() and epochs_reported(run_dir) == [1], 240, first, "epoch 1 and the stall"
        )
        first.kill()  # SIGKILL: no handler, no cleanup, as when a login node or laptop dies
    assert load_global(latest_checkpoint(run_dir))["epoch"] == 1

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert epochs_reported(run_dir) == [1, 2, 3], "the second command did not continue from epoch 1"
    assert load_global(latest_checkpoint(run_dir))["epoch"] == 3
