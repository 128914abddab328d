"""``cdd-ray sweep``: Ray Tune over the domain count, the loss weights and the gating temperature.

Each trial is a whole cdd-ray run (see ``cdd_ray.tune.trial``). Trials reserve no CPU themselves:
a run with Ray Train workers has its workers hold the CPUs (a trial that also reserved one would
deadlock two trials on 2 CPUs), and a run in-process (``ray.num_workers=0``) trains in the trial's
own process, whose reading of the store through Ray Data needs the CPUs left free (it would wait
forever if the trials held them all). An in-process trial reserves its GPU when there is one, and
Tune reuses trial processes from one trial to the next, so no process starts (and imports torch)
per trial. ``max_concurrent_trials`` follows from the cluster's GPUs (or CPUs) and the CPUs each
run asks for (``ray.num_workers`` x ``ray.cpus_per_worker``, at least one worker's worth).

With Adam the overall scale of the loss barely matters, so lambda_cross and lambda_teacher act only
through their ratio: sweep ``objective.lambda_teacher`` with ``lambda_cross`` fixed at 1.

Example::

    outcome = run_sweep(load_sweep(Path("sweeps/domains_and_weights.yaml")), resume=False)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from rich.console import Console
from rich.table import Table

from cdd_ray.config import Config, ConfigError, absolute_paths, config_to_dict, load_config
from cdd_ray.data.store import write_atomic
from cdd_ray.ray_session import check_resources, cluster_has_gpus, ensure_ray, verbose
from cdd_ray.tune.spec import LABEL_FREE_METRICS, SweepSpec
from cdd_ray.tune.trial import FAIL_ONCE_ENV, run_trial

EXPERIMENT_FILE = "experiment.json"
TRIAL_MEMORY = 512 * 1024**2  # a trial reserves memory but no CPU (see the module docstring)
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


def trial_resources(base: Config, use_gpu: bool) -> dict:
    """What one trial reserves for itself (see the module docstring)."""
    in_process_gpu = 1 if use_gpu and base.ray.num_workers == 0 else 0
    return {"cpu": 0, "gpu": in_process_gpu, "memory": TRIAL_MEMORY}


def trial_setup(base: Config, experiment_dir: Path, max_concurrent: int | None) -> tuple[object, int]:
    """The trainable (runs under ``experiment_dir/runs``, with its resources) and how many trials
    run at once."""
    runs = str(experiment_dir / "runs")
    fail_once = os.environ.get(FAIL_ONCE_ENV)
    use_gpu = cluster_has_gpus(base.ray.use_gpu)
    check_resources(base.ray.num_workers, base.ray.cpus_per_worker, use_gpu)
    trainable = tune.with_parameters(
        run_trial, base=config_to_dict(base), storage_path=runs, fail_once=fail_once
    )
    trainable = tune.with_resources(trainable, trial_resources(base, use_gpu))
    concurrency = max_concurrent or concurrent_trials(base.ray.num_workers, base.ray.cpus_per_worker, use_gpu)
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


def _flatten(values, prefix: str = "") -> dict:
    if not isinstance(values, dict):
        return {prefix: values}
    flat = {}
    for key, value in values.items():
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def experiment_dir(spec) -> Path:
    """``<storage_path>/<name>`` (resolved) of a sweep or grid spec: its experiment's folder."""
    return Path(spec.storage_path).resolve() / spec.name


def experiment_record(base: Config, trial_keys: tuple[str, ...] = (), **parts) -> dict:
    """What an experiment's trials are built from, as JSON: ``base`` (the resolved config) without
    the keys every trial sets itself (``name`` and ``ray.storage_path``, and ``trial_keys``, dotted),
    and ``parts`` (search space, grid cells, ...)."""
    values = config_to_dict(base)
    for dotted in ("name", "ray.storage_path", *trial_keys):
        section, _, key = dotted.rpartition(".")
        (values[section] if section else values).pop(key)
    return json.loads(json.dumps({"base": values, **parts}, default=str))


def check_resume(directory: Path, record: dict, console: Console) -> None:
    """Before a resume starts Ray: refuse settings other than those ``directory``'s experiment
    started with (its ``experiment.json``, see ``write_experiment``).

    Tune restores its trials and their parameters from its own state (a changed search space is
    ignored) while the base config comes from the current files and overrides: a resume with other
    settings would mix two experiments in one table. An experiment started before cdd-ray wrote the
    record is resumed unchecked, with a warning.

    Raises:
        FileNotFoundError: ``directory/trials`` holds no Tune experiment to resume.
        ConfigError: the record differs; names the file and the first differing keys (old -> new).
    """
    if not tune.Tuner.can_restore(str(directory / "trials")):
        raise FileNotFoundError(f"{directory / 'trials'}: no Tune experiment to resume")
    path = directory / EXPERIMENT_FILE
    if not path.is_file():
        console.print(
            f"[yellow]{path} is missing (the experiment started before cdd-ray recorded its settings): the "
            "resumed trials' settings are not checked against the current ones[/yellow]"
        )
        return
    before, now = _flatten(json.loads(path.read_text())), _flatten(record)
    changed = [
        f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(before.keys() | now.keys())
        if before.get(k) != now.get(k)
    ]
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ConfigError(
            f"{path}: --resume with other settings than the experiment started with ({shown}). Resume "
            "with the same command (file and overrides) and the same cdd-ray version, or start it under "
            "a new name or storage_path."
        )


def write_experiment(directory: Path, record: dict) -> None:
    """Write ``directory/experiment.json`` (atomically), right before Tune starts or restores the
    trials: a start that fails earlier leaves the record of the experiment the folder holds."""
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / EXPERIMENT_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def sweep_record(spec: SweepSpec, base: Config) -> dict:
    """``experiment_record`` of a sweep: its base config, search space, samples, scheduler, objective."""
    return experiment_record(
        base,
        search_space=spec.search_space,
        num_samples=spec.num_samples,
        scheduler=spec.scheduler,
        objective=[spec.metric, spec.mode],
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
    if resume:
        if not tune.Tuner.can_restore(str(experiment_dir)):
            raise FileNotFoundError(f"{experiment_dir}: no Tune experiment to resume")
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=samples,
                max_concurrent_trials=concurrency,
                scheduler=scheduler or FIFOScheduler(),
                reuse_actors=True,  # in-process trials keep their imports (torch, timm) from trial to trial
            ),
            run_config=tune.RunConfig(
                name=experiment_dir.name,
                storage_path=str(experiment_dir.parent),
                verbose=1 if verbose() else 0,  # quiet: cdd-ray prints the trials table at the end
                log_to_file=True,  # each trial's output in its trial folder
            ),
        )
    if not verbose():
        # Tune's newer console output prints an experiment box and a TensorBoard hint even at
        # verbose=0; the older reporter at verbose=0 prints nothing.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    return tuner.fit()


def run_sweep(spec: SweepSpec, resume: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    base = absolute_paths(load_config(spec.base_config, spec.overrides))
    sweep_dir = experiment_dir(spec)
    record = sweep_record(spec, base)
    if resume:
        check_resume(sweep_dir, record, console)  # before Ray starts
    ensure_ray()
    console.print(f"sweep directory: {sweep_dir}")
    if spec.uses_labels:
        console.print(f"[yellow]objective {spec.metric} uses test labels for model selection[/yellow]")
    else:
        console.print(f"objective {spec.metric}: label-free (held-out share {base.data.holdout_fraction})")
    trainable, concurrency = trial_setup(base, sweep_dir, spec.max_concurrent_trials)
    scheduler = _scheduler(spec, base.train.epochs)
    space = tune_space(spec.search_space)
    experiment = sweep_dir / "trials"
    write_experiment(sweep_dir, record)
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
