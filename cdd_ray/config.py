"""Run configuration: nested dataclasses with defaults, YAML files and dotted ``key=value`` overrides.

Every setting has one home here; unknown keys and out-of-range values are refused with an error
that names the key.

Example::

    config = load_config("sweeps/base.yaml", ["train.num_domains=3", "objective.gating=true"])
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cdd_ray.models.anomaly_map import DISTANCES
from cdd_ray.models.distillation.losses import AGGREGATIONS, AUGMENTS, LOSS_FORMS, ObjectiveConfig
from cdd_ray.models.distillation.student import StudentConfig, check_student
from cdd_ray.models.patchcore.memory_bank import SEARCH_BACKENDS
from cdd_ray.models.patchcore.model import MemoryBankConfig
from cdd_ray.models.patchcore.softpatch import OUTLIER_SCORES
from cdd_ray.models.symmetry import GROUPS
from cdd_ray.models.teacher import TeacherConfig
from cdd_ray.train.engine import LR_SCHEDULES, OptimConfig

PARTITIONS = ("random", "cluster", "outlier")
SCHEDULES = ("alternate", "sequential")
# distillation: RD (train.num_domains=1) and CDD (K >= 2); patchcore and softpatch: memory banks
METHODS = ("distillation", "patchcore", "softpatch")
SELECTIONS = ("last", "proxy")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


@dataclass
class DataConfig:
    path: str = ""
    category: str = ""
    image_size: int = 128
    partition: str = "random"
    outlier_domains: int = 1
    holdout_fraction: float = 0.0
    # Rows a worker shuffles together as it streams its data (cdd_ray.train.rank_stream); a part up
    # to this size is shuffled whole. Memory: this many decoded uint8 images per worker.
    shuffle_window: int = 2048
    # Decoded training rows (uint8) a rank may keep in Ray's object store, MiB; a rank with more
    # reads its rows from the Parquet store itself on every pass (cdd_ray.data.parquet_rows), as an
    # in-process run (ray.num_workers=0) always does.
    object_store_mb: float = 256.0


@dataclass
class TrainConfig:
    num_domains: int = 2
    # 100 over 50: CDD +0.004..+0.009 image AUROC per seed in each setting, RD +0.005..+0.018 (3 seeds)
    # (BENCHMARKS.md, "100 epochs"); 50 over 20: CDD +0.021..+0.032
    epochs: int = 100
    batch_size: int = 16
    schedule: str = "sequential"  # measured better than alternate (BENCHMARKS.md, follow-up grid)
    teacher_cache: bool = True
    # per worker; above it the features are computed per step (K > 1, sequential: the pseudo-normal
    # targets of the worker's shard are cached too when they fit beside the features)
    teacher_cache_mb: float = 2048.0
    checkpoint_every: int = 1
    seed: int = 0


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RayConfig:
    num_workers: int = 2
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    storage_path: str = "runs"
    eval_batch_size: int = 32
    placement_strategy: str = "PACK"  # SPREAD: one worker per node where it can (Ray placement groups)


@dataclass
class EvalConfig:
    sigma: float = 4.0
    fpr_limit: float = 0.3
    overlays: int = 4
    proxy_trim: float = 0.1
    score_test: bool = True
    # which weights are scored: the last epoch's, or (label-free) the aggregation epoch with the
    # lowest held-out proxy loss (needs data.holdout_fraction > 0)
    select: str = "last"
    report: bool = True  # report.html beside metrics.json (matplotlib figures, a few seconds)
    # RD / CDD only (PatchCore and SoftPatch keep their nearest-neighbour score): the map's distance,
    # cos (1 - cosine, RD4AD's) or cos_l2 (1 - cosine plus the Euclidean distance, each divided per
    # level by its mean over the training images), and the image score, the mean of the map's top
    # top_fraction pixels (0: the maximum, RD4AD's). See cdd_ray.models.anomaly_map.
    distance: str = "cos_l2"
    top_fraction: float = 0.01
    # RD / CDD only: test-time augmentation, the mean map over a symmetry group of the image (none,
    # flips: 4x the scoring cost, d4: 8x; cdd_ray.models.symmetry). flips: chosen by measurement,
    # BENCHMARKS.md "Test-time augmentation" (+0.005-0.012 image AUROC for RD and CDD, every seed)
    test_time_augment: str = "flips"


@dataclass
class Config:
    name: str = ""
    method: str = "distillation"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory_bank: MemoryBankConfig = field(default_factory=MemoryBankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _convert(value: object, annotation: object, key: str) -> object:
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if option in (int, float) and not isinstance(value, bool):
            try:
                converted = option(value)
            except (TypeError, ValueError):
                continue
            if option is int and isinstance(value, float) and not value.is_integer():
                continue
            return converted
        if option is str and isinstance(value, str | int | float):
            return str(value)
    raise ConfigError(f"{key}: cannot use {value!r} as {annotation}")


def _apply(target: object, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}; known: {sorted(names)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} is a section; give its keys, e.g. {dotted}.<key>=...")
            _apply(current, value, dotted + ".")
        else:
            setattr(target, key, _convert(value, hints[key], dotted))


def _nest(dotted: str, value: object) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def parse_overrides(overrides: list[str]) -> dict:
    merged: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        _merge(merged, _nest(key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return merged


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def excluded_target_domains(config: Config) -> tuple[int, ...]:
    """Domains whose students give no pseudo-normal targets: the outlier partition's suspicious
    domains (ids 0 .. outlier_domains - 1) when ``objective.outlier_domain_targets`` is false."""
    if config.objective.outlier_domain_targets or config.data.partition != "outlier":
        return ()
    return tuple(range(config.data.outlier_domains))


def method_label(config: Config) -> str:
    """rd, cdd, patchcore or softpatch: what a run is called in names and tables."""
    if config.method != "distillation":
        return config.method
    return "rd" if config.train.num_domains == 1 else "cdd"


def validate(config: Config) -> Config:
    _check(config.method in METHODS, "method", f"must be one of {METHODS}, got {config.method!r}")
    _check(config.train.num_domains >= 1, "train.num_domains", "must be >= 1")
    _check(config.train.epochs >= 1, "train.epochs", "must be >= 1")
    _check(config.train.batch_size >= 2, "train.batch_size", "must be >= 2 (BatchNorm)")
    _check(config.train.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check(config.train.schedule in SCHEDULES, "train.schedule", f"must be one of {SCHEDULES}")
    _check(config.data.partition in PARTITIONS, "data.partition", f"must be one of {PARTITIONS}")
    _check(config.data.image_size >= 32, "data.image_size", "must be >= 32")
    try:
        check_student(config.student)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _check(config.data.outlier_domains >= 1, "data.outlier_domains", "must be >= 1")
    _check(0 <= config.data.holdout_fraction < 0.5, "data.holdout_fraction", "must lie in [0, 0.5)")
    _check(
        config.data.shuffle_window >= 2 * config.train.batch_size,
        "data.shuffle_window",
        f"must be at least 2 x train.batch_size = {2 * config.train.batch_size} rows",
    )
    _check(config.data.object_store_mb >= 0, "data.object_store_mb", "must be >= 0 (MiB per rank)")
    _check(config.train.teacher_cache_mb >= 0, "train.teacher_cache_mb", "must be >= 0 (MiB per worker)")
    _check(config.optim.lr > 0, "optim.lr", f"must be positive, got {config.optim.lr}")
    _check(config.optim.lr_schedule in LR_SCHEDULES, "optim.lr_schedule", f"must be one of {LR_SCHEDULES}")
    _check(0 <= config.optim.warmup < 1, "optim.warmup", "must lie in [0, 1) (a share of the epochs)")
    _check(0 <= config.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
    _check(config.optim.clip_grad_norm >= 0, "optim.clip_grad_norm", "must be >= 0 (0: no clipping)")
    _check(0 <= config.optim.ema_decay < 1, "optim.ema_decay", "must lie in [0, 1) (0: no EMA)")
    bank = config.memory_bank
    _check(0 < bank.coreset_ratio <= 1, "memory_bank.coreset_ratio", "must lie in (0, 1]")
    _check(bank.projection_dim >= 0, "memory_bank.projection_dim", "must be >= 0 (0: no projection)")
    _check(bank.num_neighbors >= 1, "memory_bank.num_neighbors", "must be >= 1")
    _check(bank.search in SEARCH_BACKENDS, "memory_bank.search", f"must be one of {SEARCH_BACKENDS}")
    _check(
        bank.search != "faiss" or importlib.util.find_spec("faiss") is not None,
        "memory_bank.search",
        "faiss needs the faiss-cpu package (pip install faiss-cpu), or use memory_bank.search=torch",
    )
    _check(0 <= bank.drop_ratio < 1, "memory_bank.drop_ratio", "must lie in [0, 1)")
    _check(
        bank.outlier_score in OUTLIER_SCORES, "memory_bank.outlier_score", f"must be one of {OUTLIER_SCORES}"
    )
    _check(bank.outlier_neighbors >= 1, "memory_bank.outlier_neighbors", "must be >= 1")
    _check(
        0 <= config.optim.beta1 < 1 and 0 <= config.optim.beta2 < 1, "optim.beta1/beta2", "must lie in [0, 1)"
    )
    _check(config.objective.loss_form in LOSS_FORMS, "objective.loss_form", f"must be one of {LOSS_FORMS}")
    _check(0 < config.objective.hard_share <= 1, "objective.hard_share", "must lie in (0, 1]")
    _check(config.objective.augment in AUGMENTS, "objective.augment", f"must be one of {AUGMENTS}")
    _check(
        config.objective.aggregation in AGGREGATIONS,
        "objective.aggregation",
        f"must be one of {AGGREGATIONS}",
    )
    _check(config.objective.lambda_cross >= 0, "objective.lambda_cross", "must be >= 0")
    _check(config.objective.lambda_teacher >= 0, "objective.lambda_teacher", "must be >= 0")
    _check(
        config.objective.lambda_cross + config.objective.lambda_teacher > 0,
        "objective.lambda_cross/lambda_teacher",
        "cannot both be 0",
    )
    _check(config.objective.gating_temperature > 0, "objective.gating_temperature", "must be positive")
    _check(0 <= config.objective.gate_quantile < 1, "objective.gate_quantile", "must lie in [0, 1) (0: off)")
    _check(0 <= config.objective.teacher_trim < 1, "objective.teacher_trim", "must lie in [0, 1) (0: off)")
    _check(
        0 <= config.objective.feature_jitter < math.inf,
        "objective.feature_jitter",
        "must be a finite number >= 0 (0: off)",
    )
    _check(
        0 <= config.objective.synthetic_anomalies <= 1,
        "objective.synthetic_anomalies",
        "must lie in [0, 1] (0: off)",
    )
    _check(
        not (config.objective.gating and config.objective.gate_quantile > 0),
        "objective.gate_quantile",
        "and objective.gating=true are two gates of the teacher term: choose one",
    )
    if not config.objective.outlier_domain_targets:
        _check(
            config.data.partition == "outlier",
            "objective.outlier_domain_targets",
            f"false needs data.partition=outlier (got {config.data.partition!r})",
        )
        _check(
            config.train.num_domains >= config.data.outlier_domains + 2,
            "objective.outlier_domain_targets",
            f"false needs train.num_domains >= data.outlier_domains + 2 = {config.data.outlier_domains + 2} "
            "(two clean domains to teach each other)",
        )
    _check(config.ray.num_workers >= 0, "ray.num_workers", "must be >= 0 (0 runs in the driver)")
    _check(config.ray.cpus_per_worker > 0, "ray.cpus_per_worker", "must be positive")
    _check(
        config.ray.placement_strategy in PLACEMENT_STRATEGIES,
        "ray.placement_strategy",
        f"must be one of {PLACEMENT_STRATEGIES}",
    )
    _check(config.ray.max_failures >= -1, "ray.max_failures", "must be >= -1 (-1: retry forever)")
    _check(config.eval.sigma >= 0, "eval.sigma", "must be >= 0")
    _check(0 < config.eval.fpr_limit <= 1, "eval.fpr_limit", "must lie in (0, 1]")
    _check(0 <= config.eval.proxy_trim < 1, "eval.proxy_trim", "must lie in [0, 1)")
    _check(config.eval.select in SELECTIONS, "eval.select", f"must be one of {SELECTIONS}")
    _check(config.eval.distance in DISTANCES, "eval.distance", f"must be one of {DISTANCES}")
    _check(config.eval.test_time_augment in GROUPS, "eval.test_time_augment", f"must be one of {GROUPS}")
    _check(
        0 <= config.eval.top_fraction < 1, "eval.top_fraction", "must lie in [0, 1) (0: the map's maximum)"
    )
    _check(
        config.eval.select != "proxy" or config.data.holdout_fraction > 0,
        "eval.select",
        "proxy needs a held-out slice: set data.holdout_fraction > 0 (e.g. 0.1)",
    )
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        values = loaded or {}
    _merge(values, parse_overrides(overrides or []))
    config = Config()
    _apply(config, values)
    return validate(config)


def with_overrides(config: Config, overrides: list[str]) -> Config:
    """A copy of ``config`` with dotted overrides applied and validated."""
    updated = config_from_dict(config_to_dict(config))
    _apply(updated, parse_overrides(overrides))
    return validate(updated)


def absolute_paths(config: Config) -> Config:
    """Resolve the paths a run reads and writes, for processes with another working directory."""
    if config.data.path:
        config.data.path = str(Path(config.data.path).resolve())
    config.ray.storage_path = str(Path(config.ray.storage_path).resolve())
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> Config:
    config = Config()
    _apply(config, values)
    return validate(config)
