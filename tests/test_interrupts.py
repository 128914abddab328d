"""A sweep driver interrupted from outside: `cdd-ray sweep --resume` runs only the unfinished trials.

The sweep driver starts its own local Ray, as on a laptop, and gets Ctrl-C (SIGINT). A killed
`cdd-ray train` driver (SIGKILL) and its resume are tested on the two-node cluster
(tests/test_multinode.py), together with a worker lost mid-epoch.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cdd_ray.train.run import FAULT_ENV, PROGRESS_FILE
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdd_ray.cli", *args]


def wait_for(predicate, timeout: float, process: subprocess.Popen, what: str, tick=None) -> None:
    """Poll ``predicate`` (and call ``tick``) every 0.5 s; the wait is bounded, and its failure
    names what it waited for and whether the command ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None and not predicate():  # it may have ended since the check
            raise AssertionError(f"the command ended (code {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        if tick is not None:
            tick()
        time.sleep(0.5)


def epochs_reported(run_dir: Path) -> list[int]:
    path = run_dir / PROGRESS_FILE
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()] if path.is_file() else []


def terminated_trials(experiment: Path) -> set[str]:
    """Trial ids that Tune's own experiment state records as finished (what a restore keeps)."""
    finished = set()
    for state_file in experiment.glob("experiment_state-*.json"):
        try:
            state = json.loads(state_file.read_text())
        except json.JSONDecodeError:  # being rewritten right now
            continue
        for trial_json, _ in state["trial_data"]:
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                finished.add(trial["trial_id"])
    return finished


def test_sigint_to_a_sweep_then_resume_runs_only_the_unfinished_trials(ray_session, tiny_store, tmp_path):
    """The sweep driver runs its own local Ray (as on a laptop), beside the session's cluster."""
    overrides = tiny_overrides(
        tiny_store,
        tmp_path / "unused",
        **{"ray.num_workers": 0, "ray.cpus_per_worker": 1, "eval.score_test": "false"},
        **{"data.holdout_fraction": 0.2, "train.epochs": 2},
    )
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "interrupted",
                "overrides": overrides,
                "search_space": {"train.num_domains": {"grid": [1, 2, 3]}},
                "objective": {"metric": "proxy_loss", "mode": "min"},
                "storage_path": str(tmp_path / "sweeps"),
                "max_concurrent_trials": 1,
            }
        )
    )
    sweep_dir = tmp_path / "sweeps" / "interrupted"
    # Trials run one at a time in grid order (K = 1, 2, 3); the K = 2 trial stalls in its first domain
    # step (K = 1 has none), so the interrupt lands while exactly one trial has finished, however fast
    # the machine. The marker keeps the resumed sweep from stalling again.
    marker = tmp_path / "stalled"
    stall = {"action": "stall", "seconds": 40, "stage": "dst", "step": 0, "batch": 0, "marker": str(marker)}
    env = {**os.environ, "CDD_RAY_DASHBOARD": "0", "RAY_TMPDIR": tempfile.mkdtemp(prefix="cddsig")}
    env[FAULT_ENV] = json.dumps(stall)
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "first.log").open("w")
    with subprocess.Popen(cli("sweep", str(spec)), env=env, stdout=log, stderr=subprocess.STDOUT) as sweep:
        wait_for(
            lambda: marker.exists() and terminated_trials(sweep_dir / "trials"),
            600,
            sweep,
            "a first finished trial and the stall of the second",
        )
        sweep.send_signal(signal.SIGINT)
        sweep.wait(timeout=240)
    finished = terminated_trials(sweep_dir / "trials")
    assert len(finished) == 1, f"trials finished before the interrupt: {finished}"
    runs = {trial: sweep_dir / "runs" / f"run_trial_{trial}" / PROGRESS_FILE for trial in finished}
    before = {trial: path.read_text() for trial, path in runs.items()}

    resumed = subprocess.run(
        cli("sweep", str(spec), "--resume"), env=env, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for trial, path in runs.items():
        assert path.read_text() == before[trial], f"finished trial {trial} was run again"
    trials = pd.read_csv(sweep_dir / "trials.csv")
    assert sorted(trials["config/train.num_domains"]) == [1, 2, 3] and trials["proxy_loss"].notna().all()
    assert terminated_trials(sweep_dir / "trials") == set(trials["trial_id"])
