"""Driver of one run on Ray: data, domain partition, TorchTrainer (training and test scoring), report.

Example::

    outcome = run_experiment(load_config("configs/demo.yaml"))
    outcome.metrics["image_auroc"]
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from cdd_ray.config import Config, config_to_dict, method_label
from cdd_ray.data.domains import (
    DOMAINS_FILE,
    HOLDOUT,
    PartitionError,
    assign_domains,
    domain_report,
    holdout_mask,
)
from cdd_ray.data.parquet_rows import decoded_mib, store_fingerprint, uses_object_store
from cdd_ray.data.ray_data import embeddings, read_split
from cdd_ray.data.sharding import rank_dataset_name, rank_rows
from cdd_ray.data.store import SAMPLES_FILE, check_store, split_sample_ids, write_json
from cdd_ray.evaluate.scoring import (
    METRICS_FILE,
    load_detector,
    read_split_arrays,
    score_arrays,
    write_evaluation,
)
from cdd_ray.models.distillation.student import resolved_width_factor
from cdd_ray.ray_session import RAY_LOGGERS, check_resources, cluster_has_gpus, ensure_ray, log_to_file
from cdd_ray.train.checkpoint import CheckpointError, checkpoints_in, load_global
from cdd_ray.train.engine import NonFiniteLossError
from cdd_ray.train.errors import RunDirError, TrainingError
from cdd_ray.train.session import run_in_process
from cdd_ray.train.worker import plan_stages, run_loop, train_loop_per_worker

PROGRESS_FILE = "progress.jsonl"
RUN_FILE = "run.json"
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
RUN_FORMAT_VERSION = 2
FAULT_ENV = "CDD_RAY_TEST_FAULT"
TRACE_ENV = "CDD_RAY_TRACE_DIR"
# Settings a resumed run must share with the run it continues (the rest, e.g. epochs, may change).
RESUME_KEYS = (
    ("method",),
    ("data", "category"),
    ("data", "image_size"),
    ("data", "partition"),
    ("data", "holdout_fraction"),
    ("data", "shuffle_window"),  # with the seed, fixes the order of a part larger than the window
    ("teacher", "backbone"),
    ("student", "embedding_stride"),
    ("student", "width_factor"),
    ("train", "num_domains"),
    ("train", "schedule"),
    ("train", "seed"),
)


def _failure_summary(error: Exception) -> str:
    """The last line of each worker's error (e.g. "epoch 2: loss is nan in DST of domain 0")."""
    failures = getattr(error, "worker_failures", None) or {}
    lines = []
    for rank, failure in sorted(failures.items()):
        text = str(failure).strip().splitlines()
        lines.append(f"rank {rank}: {text[-1] if text else type(failure).__name__}")
    if not lines:
        text = str(error).strip().splitlines()
        lines.append(text[-1] if text else type(error).__name__)
    return "; ".join(dict.fromkeys(lines))


@dataclass
class RunOutcome:
    run_dir: Path
    checkpoint_dir: Path
    metrics: dict
    train_metrics: dict


def _lookup(values: dict, path: tuple[str, ...]) -> object:
    for key in path:
        values = values.get(key, {}) if isinstance(values, dict) else {}
    return values if values != {} else None


def _differences(previous: dict, wanted: dict) -> list[str]:
    """Resume keys that differ. A key that a run of an older version did not record is taken at
    today's default: right for a setting added with the old behaviour as its default (the
    ``student`` keys); runs written before ``data.shuffle_window`` existed did not shuffle in a
    window at all, and resume with the default window's order."""
    defaults = config_to_dict(Config())

    def value(config: dict, path: tuple[str, ...]) -> object:
        found = _lookup(config, path)
        if found is None:
            found = _lookup(defaults, path)
        if path == ("student", "width_factor"):  # null means the backbone's: compare what gets built
            found = resolved_width_factor(str(value(config, ("teacher", "backbone"))), found)
        return found

    differences = []
    for path in RESUME_KEYS:
        before, after = value(previous, path), value(wanted, path)
        if before != after:
            differences.append(f"{'.'.join(path)}: {before!r} there, {after!r} here")
    return differences


def check_run_dir(run_dir: Path, config: Config) -> None:
    """Refuse to continue a run directory written by another format or with other settings.

    Same name + storage path resumes (Ray Train's behaviour); this check turns a silent mix of two
    experiments, or an unreadable old checkpoint, into an error before any worker starts. A run
    directory without ``run.json`` (written before it existed) is judged by its last checkpoint's
    config."""
    run_file = run_dir / RUN_FILE
    wanted = config_to_dict(config)
    previous = None
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text())
        except json.JSONDecodeError as error:
            raise RunDirError(
                f"{run_file} is not valid JSON ({error}); move the run directory away"
            ) from error
        if recorded.get("format_version") != RUN_FORMAT_VERSION:
            raise RunDirError(
                f"{run_dir} was written by a cdd-ray run format {recorded.get('format_version')!r}, this "
                f"version writes {RUN_FORMAT_VERSION}: choose another `name` or move the directory away"
            )
        previous = recorded.get("config", {})
    checkpoints = checkpoints_in(run_dir)
    if checkpoints:
        try:
            state = load_global(checkpoints[-1], mmap=True)  # header only
        except CheckpointError as error:
            raise RunDirError(f"cannot resume {run_dir}: {error}") from error
        previous = previous if previous is not None else state.get("config", {})
    differences = _differences(previous, wanted) if previous is not None else []
    written_by_ray = (run_dir / RAY_TRAIN_SNAPSHOT).is_file()
    if checkpoints and wanted["ray"]["num_workers"] > 0 and not written_by_ray:
        # Ray Train resumes from its own snapshot file, which an in-process run does not write
        differences.append(
            "ray.num_workers: the checkpoints there were written in-process (ray.num_workers=0), "
            "resume them with ray.num_workers=0"
        )
    before = (previous or {}).get("train", {}).get("epochs")
    if (
        checkpoints
        and wanted["train"]["schedule"] == "sequential"
        and before not in (None, wanted["train"]["epochs"])
    ):
        # the plan puts every DST epoch before the first aggregation epoch: a longer plan would skip
        # the added DST epochs and repeat aggregation epochs
        differences.append(
            f"train.epochs: {before} there, {wanted['train']['epochs']} here (a `sequential` run cannot "
            "be extended)"
        )
    if differences:
        raise RunDirError(
            f"{run_dir} holds a run with other settings ({'; '.join(differences)}); the same name "
            "resumes a run, so choose another `name` or move the directory away"
        )
    if not run_file.is_file():
        write_json(run_file, {"format_version": RUN_FORMAT_VERSION, "config": wanted})


def run_name(config: Config, store_info: dict) -> str:
    if config.name:
        return config.name
    noise = (store_info.get("contamination") or {}).get("ratio", 0.0)
    method = method_label(config)
    method = f"cdd-k{config.train.num_domains}" if method == "cdd" else method
    return f"{config.data.category or 'all'}-{method}-noise{noise:g}-seed{config.train.seed}"


class ProgressFile(UserCallback):
    """Runs in the Train controller: appends rank 0's report of each step to the run's progress file."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as out:
            out.write(
                json.dumps({**metrics[0], "checkpoint": checkpoint.path if checkpoint else None}) + "\n"
            )


def _injected_flags(store: Path, sample_ids: list[str]) -> np.ndarray:
    """For the domain report only: which training samples are injected anomalies."""
    table = pq.read_table(
        store / SAMPLES_FILE, columns=["sample_id", "injected"], filters=[("split", "=", "train")]
    )
    flags = dict(zip(table["sample_id"].to_pylist(), table["injected"].to_pylist(), strict=True))
    return np.asarray([bool(flags.get(sid, False)) for sid in sample_ids])


def partition_embeds(config: Config) -> bool:
    """Whether partitioning embeds every training image with the teacher (a Ray Data job): a
    ``cluster`` or ``outlier`` partition into several domains (memory-bank methods have one)."""
    num_domains = config.train.num_domains if config.method == "distillation" else 1
    return config.data.partition != "random" and num_domains > 1


def partition_training_set(config: Config, store: Path) -> dict:
    """Assign every training sample a domain; returns the manifest written to domains.json.

    ``random`` needs only the sample ids (read without decoding); ``cluster`` and ``outlier`` embed
    every image with the teacher first. Memory-bank methods have one domain (0)."""
    num_domains = config.train.num_domains if config.method == "distillation" else 1
    if not partition_embeds(config):
        ids = split_sample_ids(store, "train", config.data.category)
        vectors = None
    else:
        decoded = read_split(store, "train", config.data.category, config.data.image_size).materialize()
        ids, vectors = embeddings(decoded, config.teacher)
    held_out = holdout_mask(ids, config.data.holdout_fraction, config.train.seed)
    kept = np.flatnonzero(~held_out)
    kept_ids = [ids[i] for i in kept]
    domains = np.full(len(ids), HOLDOUT, dtype=np.int64)
    domains[kept] = assign_domains(
        kept_ids,
        config.data.partition,
        num_domains,
        config.train.seed,
        None if vectors is None else vectors[kept],
        config.data.outlier_domains,
    )
    check_sizes(config, domains[kept], num_domains)
    order = np.argsort(np.asarray(ids, dtype=object).astype(str), kind="stable")
    return {
        "strategy": config.data.partition,
        "num_domains": num_domains,
        "seed": config.train.seed,
        "assignment": {ids[i]: int(domains[i]) for i in order},
        "holdout": sorted(ids[i] for i in np.flatnonzero(held_out)),
        "report": domain_report(domains[kept], _injected_flags(store, kept_ids), num_domains),
    }


def rank_datasets(
    config: Config, store: Path, manifest: dict
) -> tuple[dict[str, ray.data.Dataset], dict[int, int]]:
    """One materialized dataset per rank (``train_<rank>``) with only the rows that rank reads
    (``cdd_ray.data.sharding``), decoded once; the rows a shard and a domain share are stored once.
    A rank whose decoded rows exceed ``data.object_store_mb`` gets none: its worker reads its rows
    from the Parquet store on every pass (``cdd_ray.data.parquet_rows``), as an in-process run
    (``ray.num_workers=0``) always does: nothing to hand to another process, no Ray Data job.
    Returns the datasets and those Parquet ranks with their row counts (rank -> rows)."""
    world_size = max(1, config.ray.num_workers)
    assignment = manifest["assignment"]
    datasets, parquet_ranks = {}, {}
    # in-process (ray.num_workers=0) the one rank is this process: it reads the file itself
    in_process = config.ray.num_workers == 0
    for rank in range(world_size):
        rows = rank_rows(assignment, manifest["num_domains"], rank, world_size).ids()
        if in_process or not uses_object_store(
            len(rows), config.data.image_size, config.data.object_store_mb
        ):
            parquet_ranks[rank] = len(rows)
            continue
        datasets[rank_dataset_name(rank)] = read_split(
            store, "train", config.data.category, config.data.image_size, assignment, keep=rows
        ).materialize()
    return datasets, parquet_ranks


def data_path_lines(config: Config, store: Path, parquet_ranks: dict[int, int]) -> list[str]:
    """What the console says of the ranks that read their rows from the Parquet store (rank -> rows,
    as ``rank_datasets`` returns them; none: no line)."""
    if config.ray.num_workers == 0:  # the one reading there is: not news
        return []
    return [
        f"worker {rank}: {rows} training images = {decoded_mib(rows, config.data.image_size):.1f} MiB "
        f"decoded > data.object_store_mb={config.data.object_store_mb:g}; it reads them from "
        f"{Path(store) / SAMPLES_FILE} on every pass"
        for rank, rows in sorted(parquet_ranks.items())
    ]


def check_sizes(config: Config, domains: np.ndarray, num_domains: int) -> None:
    """Refuse, before any worker starts, a set too small for what the run will do with it.

    BatchNorm needs two images per training batch, so every domain and every rank's shard of the
    global student's data needs at least two; SoftPatch's outlier score needs more images than
    its neighbours. Raises PartitionError naming the domain, its size and the setting to change."""
    count, workers = len(domains), max(1, config.ray.num_workers)
    if config.method == "softpatch" and count <= config.memory_bank.outlier_neighbors:
        raise PartitionError(
            f"{count} training images: SoftPatch's outlier score needs more than "
            f"memory_bank.outlier_neighbors={config.memory_bank.outlier_neighbors}; lower it or add images"
        )
    if config.method != "distillation":
        return
    if count // workers < 2:
        raise PartitionError(
            f"{count} training images over ray.num_workers={config.ray.num_workers} leaves a worker fewer "
            "than 2 images to train on (BatchNorm needs 2 per batch); lower ray.num_workers or add images"
        )
    for domain in range(num_domains):
        size = int((domains == domain).sum())
        if num_domains > 1 and size < 2:
            raise PartitionError(
                f"domain {domain} holds {size} training image{'s' if size != 1 else ''} "
                f"(train.num_domains={num_domains}, {count} images, data.partition="
                f"{config.data.partition}); a domain student needs at least 2 (BatchNorm): lower "
                "train.num_domains or add images"
            )


def _follow(progress_path: Path, total: int, done: threading.Event, console: Console) -> None:
    seen = 0
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("training", total=total, info="starting workers")
        while True:
            finished = done.is_set()
            lines = progress_path.read_text().splitlines() if progress_path.exists() else []
            for line in lines[seen:]:
                report = json.loads(line)
                losses = " ".join(
                    f"{k[5:]}={v:.4f}" for k, v in sorted(report.items()) if k.startswith("loss_")
                )
                info = f"{losses} {report['images_per_second']:.1f} img/s"
                progress.update(
                    task,
                    completed=report["step"],
                    description=f"epoch {report['epoch']} [{report['stage']}]",
                    info=info,
                )
            seen = len(lines)
            if finished:
                return
            time.sleep(0.5)


def needs_ray(config: Config) -> bool:
    """Whether a run needs a Ray cluster: Ray Train workers (``ray.num_workers`` > 0), or a Ray Data
    job that embeds the training set with the teacher (a ``cluster`` or ``outlier`` partition into
    several domains). An in-process run with a ``random`` partition reads the Parquet store itself
    and starts no Ray (inside a Tune trial or an attached driver it uses the Ray that runs)."""
    return config.ray.num_workers > 0 or partition_embeds(config)


def train(
    config: Config,
    console: Console | None = None,
    trace_dir: str | None = None,
    callbacks: list[UserCallback] | None = None,
    fault: dict | None = None,
) -> tuple[Path, Path, dict]:
    """Train one run; returns (run dir, checkpoint dir, last reported metrics).

    ``callbacks`` join the run's own (e.g. Tune's TuneReportCallback inside a sweep trial).
    ``fault`` (tests only; also read as JSON from the environment variable ``CDD_RAY_TEST_FAULT``)
    injects a worker fault, see ``cdd_ray.train.worker.Fault``. ``trace_dir`` (the fixed-cost
    benchmark and tests; also read from ``CDD_RAY_TRACE_DIR``, which then applies to every run of
    the process) gets the driver's timed events and each rank's batches, digests and timings as
    JSON lines; it is made if missing."""
    console = console or Console()
    trace_dir = trace_dir or os.environ.get(TRACE_ENV) or None
    mark = DriverTrace(trace_dir)
    store = Path(config.data.path).resolve()
    store_info = check_store(store)
    name = run_name(config, store_info)
    storage = Path(config.ray.storage_path).resolve()
    run_dir = storage / name
    console.print(f"run directory: {run_dir}")
    if needs_ray(config) or ray.is_initialized():
        dashboard = ensure_ray()
        mark("ray_ready")
        if dashboard:
            console.print(f"Ray dashboard: {dashboard}")
        use_gpu = cluster_has_gpus(config.ray.use_gpu)
        waiting = check_resources(config.ray.num_workers, config.ray.cpus_per_worker, use_gpu)
        if waiting:
            console.print(f"[yellow]{waiting}[/yellow]")
    else:  # in-process with nothing for Ray to do: no Ray start (~7 s, BENCHMARKS.md "fixed cost")
        mark("ray_ready")
        use_gpu = torch.cuda.is_available() if config.ray.use_gpu is None else config.ray.use_gpu
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_dir(run_dir, config)
    handler = log_to_file(run_dir)
    try:
        return _train(
            config, console, mark, store, name, storage, run_dir, use_gpu, trace_dir, callbacks, fault
        )
    finally:
        for logger_name in RAY_LOGGERS:
            logging.getLogger(logger_name).removeHandler(handler)
        handler.close()


def _train(
    config: Config,
    console: Console,
    mark: DriverTrace,
    store: Path,
    name: str,
    storage: Path,
    run_dir: Path,
    use_gpu: bool,
    trace_dir: str | None,
    callbacks: list[UserCallback] | None,
    fault: dict | None,
) -> tuple[Path, Path, dict]:

    manifest = partition_training_set(config, store)
    write_json(run_dir / DOMAINS_FILE, manifest)
    datasets, parquet_ranks = rank_datasets(config, store, manifest)
    for line in data_path_lines(config, store, parquet_ranks):
        console.print(line)
    mark("data_ready")

    if fault is None and os.environ.get(FAULT_ENV):
        fault = json.loads(os.environ[FAULT_ENV])
    loop_config = {
        "config": config_to_dict(config),
        "domain_manifest": manifest,
        # ranks without a dataset read the Parquet store, checked against what was partitioned
        "parquet_ranks": sorted(parquet_ranks),
        "store_fingerprint": store_fingerprint(store) if parquet_ranks else None,
        "trace_dir": trace_dir,
        "fault": fault,
        "run_name": name,
        "run_dir": str(run_dir),
    }
    progress_path = run_dir / PROGRESS_FILE
    callbacks = [ProgressFile(str(progress_path)), *(callbacks or [])]
    started = time.time()
    done = threading.Event()
    follower = threading.Thread(
        target=_follow, args=(progress_path, len(plan_stages(config)), done, console), daemon=True
    )
    follower.start()
    try:
        mark("fit_start")
        if config.ray.num_workers == 0:
            device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
            threads = max(1, int(config.ray.cpus_per_worker))
            metrics, checkpoint = run_in_process(
                run_loop, loop_config, datasets, run_dir, device, callbacks, threads
            )
        else:
            result = _torch_trainer(config, loop_config, datasets, storage, name, use_gpu, callbacks).fit()
            metrics, checkpoint = dict(result.metrics or {}), result.checkpoint
            checkpoint = None if checkpoint is None else Path(checkpoint.path)
        mark("fit_end")
    except (ray.train.TrainingFailedError, NonFiniteLossError) as error:
        kept = [p.name for p in checkpoints_in(run_dir)]
        resume = (
            f"last good checkpoint kept: {kept[-1]}; the same command resumes from it."
            if kept
            else "no checkpoint was written, so the same command starts the run again."
        )
        raise TrainingError(
            f"run {name} failed ({_failure_summary(error)}). Run directory {run_dir}; {resume}"
        ) from error
    finally:
        done.set()
        follower.join()
    if checkpoint is None:
        raise RuntimeError(f"run {name} produced no checkpoint (see {run_dir})")
    if config.eval.score_test:
        _record_checkpoint(config, run_dir, checkpoint, started)
    mark("end")
    return run_dir, checkpoint, metrics


def _torch_trainer(
    config: Config,
    loop_config: dict,
    datasets: dict,
    storage: Path,
    name: str,
    use_gpu: bool,
    callbacks: list[UserCallback],
) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.ray.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": config.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=config.ray.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=config.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Each rank reads its own dataset (train_<rank>, rows chosen by sample id): Ray's streaming
        # split would hand blocks to whichever worker asks first, and a restart would differ.
        dataset_config=DataConfig(datasets_to_split=[]),
    )


class DriverTrace:
    """Timed driver events (wall clock) in ``trace_dir/driver.jsonl``, for the fixed-cost benchmark."""

    def __init__(self, trace_dir: str | None):
        self.path = Path(trace_dir) / "driver.jsonl" if trace_dir else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self("start")

    def __call__(self, event: str) -> None:
        if self.path is not None:
            with self.path.open("a") as out:
                out.write(json.dumps({"event": event, "t": time.time()}) + "\n")


def _record_checkpoint(config: Config, run_dir: Path, checkpoint_dir: Path, started: float) -> None:
    """The workers score before Ray names the final checkpoint; metrics.json gets its path here.
    A run that had nothing left to train (it had finished before) is scored here instead."""
    metrics_file = run_dir / METRICS_FILE
    if not metrics_file.is_file() or metrics_file.stat().st_mtime < started:
        evaluate(config, run_dir, checkpoint_dir)
        return
    metrics = json.loads(metrics_file.read_text())
    metrics["checkpoint"] = str(checkpoint_dir)
    write_json(metrics_file, metrics)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def evaluate(config: Config, run_dir: Path, checkpoint_dir: Path) -> dict:
    """Score the test set in this process with a checkpoint's detector; writes metrics.json and
    overlays and returns the metrics (``cdd-ray evaluate``; training runs score in their workers)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detector, _ = load_detector(checkpoint_dir, device)
    test = read_split_arrays(Path(config.data.path), "test", config.data.category, config.data.image_size)
    results = score_arrays(detector, test, config.ray.eval_batch_size)
    return write_evaluation(run_dir, config, results, str(checkpoint_dir))


def run_experiment(
    config: Config, console: Console | None = None, trace_dir: str | None = None
) -> RunOutcome:
    run_dir, checkpoint_dir, train_metrics = train(config, console, trace_dir)
    # eval.score_test=false: no labeled test set (or no wish to score it now); `cdd-ray evaluate` later.
    metrics = read_metrics(run_dir) if config.eval.score_test else {}
    return RunOutcome(run_dir, checkpoint_dir, metrics, train_metrics)


def latest_checkpoint(run_dir: Path) -> Path:
    candidates = checkpoints_in(run_dir)
    if not candidates:
        raise FileNotFoundError(f"{run_dir}: no checkpoint with global.pt; is this a cdd-ray run directory?")
    return candidates[-1]
