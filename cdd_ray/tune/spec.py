"""Sweep and grid specification files (YAML), validated with errors that name the key.

A sweep file::

    name: domains_and_weights
    base_config: cdd_synthetic.yaml            # optional run config, relative to this file
    overrides: [data.holdout_fraction=0.2]      # dotted overrides on top of it
    search_space:                               # dotted config key -> one sampler
      train.num_domains: {grid: [1, 2, 3]}
      objective.lambda_teacher: {choice: [0.0, 0.5, 1.0]}
      objective.gating_temperature: {loguniform: [0.03, 1.0]}
    num_samples: 1                              # repeats of the grid (random samplers redrawn)
    scheduler: fifo                             # or asha (stops on the per-epoch loss_global)
    objective: {metric: proxy_loss, mode: min}  # proxy_loss needs no labels; image_auroc does
    storage_path: sweeps_out

A grid file lists ``categories``, ``noise_ratios``, ``overlap``, ``seeds`` and ``methods``
(name -> overrides); see ``cdd_ray.tune.grid``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cdd_ray.config import ConfigError

SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("fifo", "asha")
LABEL_FREE_METRICS = ("proxy_loss",)
LABELED_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")


@dataclass
class SweepSpec:
    name: str
    search_space: dict[str, dict]
    base_config: str | None = None
    overrides: list[str] = field(default_factory=list)
    num_samples: int = 1
    scheduler: str = "fifo"
    metric: str = "proxy_loss"
    mode: str = "min"
    storage_path: str = "sweeps_out"
    max_concurrent_trials: int | None = None

    @property
    def uses_labels(self) -> bool:
        return self.metric in LABELED_METRICS


def _read_yaml(path: Path) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return values


def resolve_base_config(value: str | None, spec_path: Path) -> str | None:
    """A base_config path in a sweep or grid file is relative to that file."""
    if value is None or Path(value).is_absolute():
        return value
    return str((Path(spec_path).parent / value).resolve())


def _check_sampler(key: str, sampler: object) -> None:
    if not isinstance(sampler, dict) or len(sampler) != 1 or next(iter(sampler)) not in SAMPLERS:
        raise ConfigError(f"search_space.{key}: give exactly one of {SAMPLERS}, e.g. {{grid: [1, 2]}}")
    kind, values = next(iter(sampler.items()))
    if kind in ("grid", "choice") and (not isinstance(values, list) or not values):
        raise ConfigError(f"search_space.{key}.{kind}: needs a non-empty list")
    if kind in ("uniform", "loguniform", "randint") and (not isinstance(values, list) or len(values) != 2):
        raise ConfigError(f"search_space.{key}.{kind}: needs [low, high]")
    if kind == "loguniform" and min(values) <= 0:
        raise ConfigError(f"search_space.{key}.loguniform: bounds must be positive")


def load_sweep(path: Path, extra_overrides: list[str] | None = None) -> SweepSpec:
    values = _read_yaml(path)
    known = set(SweepSpec.__dataclass_fields__) | {"objective"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {unknown}; known: {sorted(known)}")
    objective = values.pop("objective", {}) or {}
    spec = SweepSpec(
        name=values.get("name") or Path(path).stem,
        search_space=values.get("search_space") or {},
        base_config=resolve_base_config(values.get("base_config"), path),
        overrides=list(values.get("overrides") or []) + list(extra_overrides or []),
        num_samples=int(values.get("num_samples", 1)),
        scheduler=values.get("scheduler", "fifo"),
        metric=objective.get("metric", "proxy_loss"),
        mode=objective.get("mode", "min"),
        storage_path=values.get("storage_path", "sweeps_out"),
        max_concurrent_trials=values.get("max_concurrent_trials"),
    )
    if not spec.search_space:
        raise ConfigError(f"{path}: search_space is empty")
    for key, sampler in spec.search_space.items():
        _check_sampler(key, sampler)
    if spec.scheduler not in SCHEDULERS:
        raise ConfigError(f"{path}: scheduler must be one of {SCHEDULERS}, got {spec.scheduler!r}")
    if spec.metric not in LABEL_FREE_METRICS + LABELED_METRICS:
        raise ConfigError(f"{path}: objective.metric must be one of {LABEL_FREE_METRICS + LABELED_METRICS}")
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"{path}: objective.mode must be min or max")
    if spec.num_samples < 1:
        raise ConfigError(f"{path}: num_samples must be >= 1")
    return spec
