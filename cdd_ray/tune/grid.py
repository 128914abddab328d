"""``cdd-ray grid``: the FUAD benchmark grid, category x noise ratio x overlap x seed x method.

Every (noise, overlap, seed) cell gets its own prepared store (the contamination protocol is seeded),
kept under ``data/<source_key>`` so that a grid file edited to another source never reuses old ones;
every grid point is one Tune trial (a whole cdd-ray run), run concurrently as resources allow, the
longest first (``trial_cost``: a slot that gets the last long trial late idles the others). The
summary holds mean and standard deviation over seeds per (category, noise, overlap, method), as
Parquet and as a Markdown table in the format of a paper's table, with RD on clean data as the
reference row when the grid has it.

A grid file::

    name: fuad_grid
    base_config: cdd_synthetic.yaml
    overrides: [train.epochs=8]
    source: {kind: synthetic, image_size: 128}     # or {kind: mvtec, root: /data/mvtec_ad}
                                                   # or {kind: photos} (the photo benchmark);
                                                   # defect_types: [stain] concentrates the noise
    categories: [weave, granite, bolts, pill]
    noise_ratios: [0.0, 0.1, 0.2]
    overlap: [false]
    seeds: [0, 1, 2]
    methods: {rd: [train.num_domains=1], cdd: [train.num_domains=2]}
    storage_path: grids_out
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from ray import tune
from rich.console import Console

from cdd_ray.config import Config, ConfigError, absolute_paths, load_config, with_overrides
from cdd_ray.data.photos import PhotoBenchmarkConfig, write_photo_benchmark
from cdd_ray.data.prepare import prepare
from cdd_ray.data.store import STORE_FILE, write_atomic
from cdd_ray.data.synthetic import SyntheticConfig
from cdd_ray.evaluate.html_report import write_grid_summary
from cdd_ray.evaluate.report import METRIC_KEYS
from cdd_ray.ray_session import ensure_ray
from cdd_ray.tune.spec import _read_yaml, resolve_base_config
from cdd_ray.tune.sweep import (
    check_resume,
    experiment_dir,
    experiment_record,
    fit_trials,
    trial_setup,
    write_experiment,
    write_trials,
)

GRID_LABELS = ("category", "noise", "overlap", "seed", "method")


@dataclass
class GridSpec:
    name: str
    categories: list[str]
    noise_ratios: list[float]
    seeds: list[int]
    methods: dict[str, list[str]]
    overlap: list[bool] = field(default_factory=lambda: [False])
    source: dict = field(default_factory=lambda: {"kind": "synthetic"})
    base_config: str | None = None
    overrides: list[str] = field(default_factory=list)
    storage_path: str = "grids_out"
    max_concurrent_trials: int | None = None


def load_grid(path: Path, extra_overrides: list[str] | None = None) -> GridSpec:
    values = _read_yaml(path)
    unknown = sorted(set(values) - set(GridSpec.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {unknown}")
    for key in ("categories", "noise_ratios", "seeds", "methods"):
        if not values.get(key):
            raise ConfigError(f"{path}: {key} must be given and non-empty")
    values.setdefault("name", Path(path).stem)
    values["base_config"] = resolve_base_config(values.get("base_config"), path)
    values["overrides"] = list(values.get("overrides") or []) + list(extra_overrides or [])
    return GridSpec(**values)


def source_key(spec: GridSpec) -> str:
    """A 10-hex-digit key of what a grid's prepared data depend on: its ``source`` and ``categories``.

    Noise ratio, overlap and seed are in each store's own folder name; the settings the grid file
    spells out (image size, defect placement, defect types, an MVTec root resolved against the working
    directory, the category list and its order) are in the key, so that an edited grid file never
    reuses data prepared for another one. Settings left to their defaults are not: spelling a default
    out prepares the same data again under another key, and a change of the defaults in code (or of
    how data are written) is not seen by a grid folder prepared before it.
    """
    return hashlib.sha1(json.dumps(_source_record(spec), sort_keys=True).encode()).hexdigest()[:10]


def _source_record(spec: GridSpec) -> dict:
    source = dict(spec.source)
    if source.get("root") is not None:  # the same relative root from another folder is other data
        source["root"] = str(Path(source["root"]).resolve())
    return json.loads(json.dumps({"source": source, "categories": list(spec.categories)}, default=str))


def data_dir(spec: GridSpec, grid_dir: Path) -> Path:
    """``<grid>/data/<source_key>``: one source's stores (and its photo tree, for ``kind: photos``)."""
    return grid_dir / "data" / source_key(spec)


def _store_dir(data: Path, noise: float, overlap: bool, seed: int) -> Path:
    return data / "stores" / f"noise{noise:g}-overlap{int(overlap)}-seed{seed}"


def prepare_stores(spec: GridSpec, grid_dir: Path, console: Console) -> dict[tuple, Path]:
    """One store per (noise, overlap, seed) under ``data_dir``; a complete one is reused.

    ``source.json`` beside them records the source settings and categories they were prepared from
    (written first, so an interrupted preparation is completed by the next run of the same grid).
    """
    source = dict(spec.source)
    kind = source.pop("kind")
    root = source.pop("root", None)
    defect_types = source.pop("defect_types", ())
    synthetic = SyntheticConfig(**source) if kind == "synthetic" else None
    data = data_dir(spec, grid_dir)
    if not (data / "source.json").is_file():
        data.mkdir(parents=True, exist_ok=True)
        write_atomic(data / "source.json", json.dumps(_source_record(spec), indent=2) + "\n")
    if kind == "photos":  # the photo benchmark, written once as an MVTec tree, read like a user's data
        root = data / "photos_tree"
        if not root.exists():
            console.print(f"writing the photo benchmark to {root}")
            write_photo_benchmark(root, PhotoBenchmarkConfig(categories=tuple(spec.categories), **source))
        kind = "mvtec"
    stores = {}
    for noise, overlap, seed in itertools.product(spec.noise_ratios, spec.overlap, spec.seeds):
        out = _store_dir(data, noise, overlap, seed)
        if not (out / STORE_FILE).is_file():
            console.print(f"preparing {out.name}")
            prepare(
                kind,
                Path(root) if root else None,
                out,
                spec.categories,
                noise,
                overlap,
                seed,
                resample=bool(defect_types),
                synthetic=synthetic,
                defect_types=defect_types,
            )
        stores[(noise, overlap, seed)] = out
    return stores


def trial_cost(config: Config) -> int:
    """A trial's training cost in RD epochs, the key that orders a grid's trials longest first.

    A memory bank (PatchCore, SoftPatch) trains nothing: 0. RD: ``train.epochs``. CDD (K >= 2):
    twice that, its domain students' passes plus the global student's (measured 1.6-2.4x RD's time
    per cell with the shipped ``sequential`` schedule, BENCHMARKS.md "100 epochs"). A rough key, not
    a time: equal keys keep the grid file's order.
    """
    if config.method != "distillation":
        return 0
    return config.train.epochs * (1 if config.train.num_domains == 1 else 2)


def method_costs(spec: GridSpec, base: Config) -> dict[str, int]:
    """``trial_cost`` of each of the grid's methods; applying their overrides to ``base`` checks them,
    so a misspelt method override is a ``ConfigError`` naming the key before any trial starts."""
    costs = {}
    for method, overrides in spec.methods.items():
        try:
            costs[method] = trial_cost(with_overrides(base, overrides))
        except ConfigError as error:
            raise ConfigError(f"grid method {method!r}: {error}") from error
    return costs


def grid_record(spec: GridSpec, base: Config) -> dict:
    """``experiment_record`` of a grid: its base config (less the data path, category and seed each
    cell sets) and its methods, categories, noise ratios, overlaps and seeds."""
    cells_of = {k: getattr(spec, k) for k in ("methods", "categories", "noise_ratios", "overlap", "seeds")}
    return experiment_record(base, ("data.path", "data.category", "train.seed"), **cells_of)


def check_grid_resume(spec: GridSpec, record: dict, console: Console) -> None:
    """Before a grid's resume starts Ray: its data were prepared from this grid file's source and
    categories (restored trials keep the data paths they started with), and ``record``
    (``grid_record``) is the one it started with (``check_resume``).

    Raises:
        ConfigError: another source or category list, or other settings; names what differs.
        FileNotFoundError: nothing to resume.
    """
    grid_dir = experiment_dir(spec)
    if not (data_dir(spec, grid_dir) / "source.json").is_file():
        raise ConfigError(
            f"{grid_dir}: no data prepared for this grid file's source and categories "
            f"(data/{source_key(spec)} is missing): the grid was started with another source, or "
            "before grid data were keyed by source; --resume continues a grid only with the grid file it "
            "started with. Run it without --resume under a new name or storage_path."
        )
    check_resume(grid_dir, record, console)


def grid_cells(spec: GridSpec, stores: dict[tuple, Path], costs: dict[str, int] | None = None) -> list[dict]:
    """One Tune trial per (category, noise, overlap, seed, method); with ``costs`` (``method_costs``)
    the costliest methods' trials come first (Tune starts a grid's trials in this order), ties in the
    grid file's order."""
    cells = []
    for category, noise, overlap, seed, method in itertools.product(
        spec.categories, spec.noise_ratios, spec.overlap, spec.seeds, spec.methods
    ):
        overrides = [
            *spec.methods[method],
            f"data.path={stores[(noise, overlap, seed)]}",
            f"data.category={category}",
            f"train.seed={seed}",
        ]
        labels = {"category": category, "noise": noise, "overlap": overlap, "seed": seed, "method": method}
        cells.append({"overrides": overrides, "labels": labels})
    if costs is not None:
        cells.sort(key=lambda cell: -costs[cell["labels"]["method"]])  # stable: ties keep their order
    return cells


def summarize_grid(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds for each (category, noise, overlap, method)."""
    metrics = [m for m in METRIC_KEYS if m in frame]
    grouped = frame.groupby(["category", "noise", "overlap", "method"], sort=True)[metrics]
    summary = grouped.agg(["mean", "std", "count"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    return summary.reset_index()


def markdown_table(summary: pd.DataFrame) -> str:
    """Rows per (method, noise, overlap), columns per category plus the mean; cells 'mean ± std'."""
    metric = "image_auroc"
    lines = []
    categories = sorted(summary["category"].unique())
    header = "| method | noise | overlap | " + " | ".join(categories) + " | mean |"
    lines += [f"{metric} (mean ± std over seeds)", "", header, "|" + "---|" * (len(categories) + 4)]
    rows = summary.sort_values(["noise", "method"], key=lambda c: c if c.name == "noise" else c != "rd")
    reference = rows[(rows["method"] == "rd") & (rows["noise"] == 0)]
    ordered = pd.concat([reference, rows.drop(reference.index)])
    for (method, noise, overlap), part in ordered.groupby(["method", "noise", "overlap"], sort=False):
        cells = []
        for category in categories:
            row = part[part["category"] == category]
            if row.empty:
                cells.append("-")
            else:
                std = row[f"{metric}_std"].iloc[0]
                spread = "" if pd.isna(std) else f" ± {std:.3f}"
                cells.append(f"{row[f'{metric}_mean'].iloc[0]:.3f}{spread}")
        label = f"{method} (clean reference)" if method == "rd" and noise == 0 else method
        mean = part[f"{metric}_mean"].mean()
        lines.append(f"| {label} | {noise:g} | {overlap} | " + " | ".join(cells) + f" | {mean:.3f} |")
    return "\n".join(lines) + "\n"


def run_grid(
    spec: GridSpec, resume: bool = False, console: Console | None = None, print_table: bool = True
) -> dict:
    console = console or Console()
    grid_dir = experiment_dir(spec)
    base = absolute_paths(load_config(spec.base_config, spec.overrides))
    costs = method_costs(spec, base)  # checks every method's overrides before Ray starts
    record = grid_record(spec, base)
    if resume:
        check_grid_resume(spec, record, console)
    ensure_ray()
    console.print(f"grid directory: {grid_dir}")
    stores = prepare_stores(spec, grid_dir, console)
    cells = grid_cells(spec, stores, costs)
    trainable, concurrency = trial_setup(base, grid_dir, spec.max_concurrent_trials)
    space = {"cell": tune.grid_search(cells)}
    write_experiment(grid_dir, record)
    results = fit_trials(trainable, space, grid_dir / "trials", concurrency, resume=resume)
    frame = results.get_dataframe()
    # Tune flattens the nested cell into config/cell/labels/<key> and config/cell/overrides columns.
    frame = frame.rename(columns={f"config/cell/labels/{label}": label for label in GRID_LABELS})
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("config/cell/")])
    write_trials(grid_dir, frame)
    summary = summarize_grid(frame)
    write_atomic(grid_dir / "summary.parquet", summary.to_parquet(index=False))
    table = markdown_table(summary)
    write_atomic(grid_dir / "summary.md", table)
    if "image_auroc" in frame:
        write_grid_summary(
            grid_dir / "summary.html", frame.dropna(subset=["image_auroc"]), f"grid {spec.name}"
        )
    write_atomic(
        grid_dir / "grid.json", json.dumps({"cells": len(cells), "errors": len(results.errors)}) + "\n"
    )
    if print_table:
        console.print(table)
    return {"grid_dir": grid_dir, "summary": summary, "summary_markdown": grid_dir / "summary.md"}
