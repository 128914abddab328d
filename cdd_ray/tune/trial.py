"""One Tune trial: a full cdd-ray run (TorchTrainer + evaluation) with the trial's overrides.

Train V2 inside Tune: the function trainable builds and fits the TorchTrainer itself, and
``AggregationReports`` forwards each aggregation epoch's report (loss_global, ...) to Tune, which ASHA uses.
The label-free proxy comes with each epoch's report when the run holds out part of the training set;
the run's workers score the test set at its end (labeled metrics, unless ``eval.score_test=false``)
and one final ``tune.report`` carries everything.

``CDD_RAY_TEST_FAIL_ONCE=<path>`` in the driver's environment (tests only) makes the first trial
that creates <path> fail, to simulate an interrupted sweep, once a second trial has started beside
it (what it saw is written into <path>).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from rich.console import Console

from cdd_ray.config import config_from_dict, with_overrides
from cdd_ray.evaluate.report import METRIC_KEYS
from cdd_ray.train.run import read_metrics, train

FAIL_ONCE_ENV = "CDD_RAY_TEST_FAIL_ONCE"


class AggregationReports(TuneReportCallback):
    """Forwards to Tune only the reports of epochs that trained the global student.

    With ``train.schedule=sequential`` the DST epochs come first and carry no global-student metric
    (``loss_global``, ``proxy_loss``); Tune refuses a result without its scheduler's metric, and ASHA
    would count those epochs as rungs. With ``alternate`` (and K = 1) every report is forwarded.
    An in-process run (``ray.num_workers=0``) reports from the trial's own process, so its reports go
    straight to ``tune.report``."""

    def __init__(self, in_process: bool):
        super().__init__()
        self.in_process = in_process

    def after_report(self, run_context, metrics, checkpoint):
        if "loss_global" not in metrics[0]:
            return
        if self.in_process:
            tune.report(dict(metrics[0]))
        else:
            super().after_report(run_context, metrics, checkpoint)


def trial_overrides(params: dict) -> list[str]:
    """Search-space values as dotted overrides; a grid ``cell`` carries its own override list."""
    overrides = []
    for key, value in params.items():
        if key == "cell":
            overrides += list(value["overrides"])
        else:
            overrides.append(f"{key}={value}")
    return overrides


def _fail_once_for_tests(marker: str | None, wait_s: float = 120.0) -> None:
    """Tests only: every trial leaves ``<marker>.started-<pid>-<ns>``; the first to create ``marker``
    waits (at most ``wait_s``) until another trial has started, writes into ``marker`` whether one
    did (``concurrent``) or not (``alone``: the sweep ran one trial at a time), and fails."""
    if not marker:
        return
    Path(f"{marker}.started-{os.getpid()}-{time.time_ns()}").touch()
    try:
        handle = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    deadline = time.monotonic() + wait_s
    while len(list(Path(marker).parent.glob(f"{Path(marker).name}.started-*"))) < 2:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    others = len(list(Path(marker).parent.glob(f"{Path(marker).name}.started-*"))) - 1
    os.write(handle, b"concurrent" if others else b"alone")
    os.close(handle)
    raise RuntimeError(f"test fault: this trial was made to fail ({FAIL_ONCE_ENV})")


def run_trial(params: dict, base: dict, storage_path: str, fail_once: str | None = None) -> None:
    """The Tune trainable; ``base`` is the resolved run config (absolute paths) as a dict."""
    started = time.time()
    _fail_once_for_tests(fail_once)
    name = tune.get_context().get_trial_name()
    run_settings = [f"name={name}", f"ray.storage_path={storage_path}"]
    config = with_overrides(config_from_dict(base), [*trial_overrides(params), *run_settings])
    reports = AggregationReports(in_process=config.ray.num_workers == 0)
    run_dir, _, final = train(config, Console(quiet=True), callbacks=[reports])
    if config.eval.score_test:
        metrics = read_metrics(run_dir)
        final.update({key: metrics[key] for key in METRIC_KEYS if key in metrics})
    final.update(run_dir=str(run_dir), trial_started=started, trial_finished=time.time())
    tune.report(final)
