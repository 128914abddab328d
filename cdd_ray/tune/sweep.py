"""``cdd-ray sweep``: Ray Tune over the domain count, the loss weights and the gating temperature.

Each trial is a whole cdd-ray run (see ``cdd_ray.tune.trial``). Trials reserve no CPU themselves
(their TorchTrainer workers do; a trial that reserved one would deadlock two trials on 2 CPUs), and
``max_concurrent_trials`` follows from the cluster's GPUs (or CPUs) and the workers per trial.

With Adam the overall scale of the loss barely matters, so lambda_cross and lambda_teacher act only
through their ratio: sweep ``objective.lambda_teacher`` with ``lambda_cross`` fixed at 1.

Example::

    outcome = run_sweep(load_sweep(Path("sweeps/domains_and_weights.yaml")), resume=False)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from rich.console import Console
from rich.table import Table

from cdd_ray.config import Config, absolute_paths, config_to_dict, load_config
from cdd_ray.data.store import write_atomic
from cdd_ray.ray_session import cluster_has_gpus, ensure_ray
from cdd_ray.tune.spec import LABEL_FREE_METRICS, SweepSpec
from cdd_ray.tune.trial import FAIL_ONCE_ENV, run_trial

# A trial reserves memory but no CPU: its TorchTrainer workers hold the CPUs (see module docstring).
TRIAL_RESOURCES = {"cpu": 0, "memory": 512 * 1024**2}
SAMPLER_FACTORIES = {
    "grid": tune.grid_search,
    "choice": tune.choice,
    "uniform": lambda bounds: tune.uniform(*bounds),
    "loguniform": lambda bounds: tune.loguniform(*bounds),
    "randint": lambda bounds: tune.randint(*bounds),
}


def tune_space(search_space: dict[str, dict]) -> dict:
    space = {}
    for key, sampler in search_space.items():
        kind, values = next(iter(sampler.items()))
        space[key] = SAMPLER_FACTORIES[kind](values)
    return space


def concurrent_trials(workers: int, cpus_per_worker: float, use_gpu: bool) -> int:
    """How many trials fit the cluster at once, from the resources each trial's workers take."""
    resources = ray.cluster_resources()
    if use_gpu:
        return max(1, int(resources.get("GPU", 0) // max(1, workers)))
    return max(1, math.floor(resources.get("CPU", 1) / max(cpus_per_worker * max(1, workers), 1e-9)))


def trial_setup(base: Config, experiment_dir: Path, max_concurrent: int | None) -> tuple[object, int]:
    """The trainable (runs under ``experiment_dir/runs``) and how many trials run at once."""
    runs = str(experiment_dir / "runs")
    fail_once = os.environ.get(FAIL_ONCE_ENV)
    trainable = tune.with_parameters(
        run_trial, base=config_to_dict(base), storage_path=runs, fail_once=fail_once
    )
    concurrency = max_concurrent or concurrent_trials(
        base.ray.num_workers, base.ray.cpus_per_worker, cluster_has_gpus(base.ray.use_gpu)
    )
    return trainable, concurrency


def _scheduler(spec: SweepSpec, epochs: int):
    """ASHA needs a per-epoch signal: the proxy when it is the objective (every aggregation epoch
    reports it), else the global student's training loss (test metrics exist only after training).

    A trial reports once per aggregation epoch and once more at the end (evaluation), and ASHA stops
    a trial that reaches ``max_t``: ``max_t = epochs + 1`` lets a surviving trial finish its final
    report instead of being stopped at its last epoch."""
    if spec.scheduler != "asha":
        return FIFOScheduler()
    metric, mode = (spec.metric, spec.mode) if spec.metric in LABEL_FREE_METRICS else ("loss_global", "min")
    return ASHAScheduler(
        time_attr="training_iteration", metric=metric, mode=mode, max_t=epochs + 1, grace_period=1
    )


def write_trials(directory: Path, frame: pd.DataFrame) -> None:
    """All trials as Parquet and CSV (written under temporary names, then renamed)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "trials.csv", frame.to_csv(index=False))
    write_atomic(directory / "trials.parquet", frame.to_parquet(index=False))


def trials_table(frame: pd.DataFrame, params: list[str], metric: str, title: str) -> Table:
    table = Table(title=title)
    for column in ["trial", *params, metric]:
        table.add_column(column)
    for _, row in frame.iterrows():
        value = row.get(metric)
        shown = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
        table.add_row(str(row["trial_id"]), *[str(row.get(f"config/{p}")) for p in params], shown)
    return table


def fit_trials(
    trainable,
    param_space: dict,
    experiment_dir: Path,
    concurrency: int,
    scheduler=None,
    samples: int = 1,
    resume: bool = False,
) -> tune.ResultGrid:
    """Run (or, with ``resume``, restore and finish) a Tune experiment of cdd-ray trials.

    Restoring keeps finished trials as they are and re-runs only unfinished or errored ones."""
    trainable = tune.with_resources(trainable, TRIAL_RESOURCES)
    if resume:
        if not tune.Tuner.can_restore(str(experiment_dir)):
            raise FileNotFoundError(f"{experiment_dir}: no Tune experiment to resume")
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=samples, max_concurrent_trials=concurrency, scheduler=scheduler or FIFOScheduler()
            ),
            run_config=tune.RunConfig(name=experiment_dir.name, storage_path=str(experiment_dir.parent)),
        )
    return tuner.fit()


def run_sweep(spec: SweepSpec, resume: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    ensure_ray()
    base = absolute_paths(load_config(spec.base_config, spec.overrides))
    storage = Path(spec.storage_path).resolve()
    sweep_dir = storage / spec.name
    console.print(f"sweep directory: {sweep_dir}")
    if spec.uses_labels:
        console.print(f"[yellow]objective {spec.metric} uses test labels for model selection[/yellow]")
    else:
        console.print(f"objective {spec.metric}: label-free (held-out share {base.data.holdout_fraction})")
    trainable, concurrency = trial_setup(base, sweep_dir, spec.max_concurrent_trials)
    scheduler = _scheduler(spec, base.train.epochs)
    space = tune_space(spec.search_space)
    experiment = sweep_dir / "trials"
    results = fit_trials(trainable, space, experiment, concurrency, scheduler, spec.num_samples, resume)
    frame = results.get_dataframe()
    write_trials(sweep_dir, frame)
    params = list(spec.search_space)
    console.print(trials_table(frame, params, spec.metric, f"sweep {spec.name}: {len(frame)} trials"))
    finished = frame.dropna(subset=[spec.metric]) if spec.metric in frame else frame.iloc[0:0]
    best = None
    if len(finished):
        row = finished.sort_values(spec.metric, ascending=spec.mode == "min").iloc[0]
        best = {p: row[f"config/{p}"] for p in params} | {spec.metric: float(row[spec.metric])}
        console.print(f"best configuration: {best}")
    return {"sweep_dir": sweep_dir, "trials": frame, "best": best, "errors": len(results.errors)}
