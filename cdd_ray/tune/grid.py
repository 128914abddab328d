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
    exclude: [{method: cdd, noise: 0.0}]           # optional: leave out the cells that match every
                                                   # key of an entry (here CDD on clean data)
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
    # cells left out: each entry maps some of GRID_LABELS to a value; a cell matching every key of
    # any entry is not run (e.g. [{method: cdd, noise: 0.0}]); checked by ``check_exclude``
    exclude: list[dict] = field(default_factory=list)


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
    values["exclude"] = values.get("exclude") or []  # a mapping or a string: check_exclude names it
    spec = GridSpec(**values)
    check_exclude(spec, where=str(path))
    return spec


def label_values(spec: GridSpec) -> dict[str, list]:
    """Each of ``GRID_LABELS`` with the values the grid gives it (its cells are their product)."""
    sequences = (spec.categories, spec.noise_ratios, spec.overlap, spec.seeds, spec.methods)
    return {label: list(values) for label, values in zip(GRID_LABELS, sequences, strict=True)}


def check_exclude(spec: GridSpec, where: str = "grid") -> None:
    """Every ``exclude`` entry is a non-empty mapping of grid labels to values the grid has (a
    misspelt key or a value the grid lacks would exclude nothing, silently), and some cell is left.

    Raises:
        ConfigError: names ``<where>: exclude[i]`` and the key or value at fault.
    """
    if not isinstance(spec.exclude, list):
        raise ConfigError(f"{where}: exclude must be a list of mappings, got {spec.exclude!r}")
    values = label_values(spec)
    for i, entry in enumerate(spec.exclude):
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(f"{where}: exclude[{i}] must be a non-empty mapping of grid labels: {entry!r}")
        for key, value in entry.items():
            if key not in values:
                raise ConfigError(f"{where}: exclude[{i}]: unknown key {key!r} (one of {', '.join(values)})")
            if not any(_same(value, known) for known in values[key]):
                raise ConfigError(
                    f"{where}: exclude[{i}]: {key} {value!r} is not among the grid's {values[key]}"
                )
    if not cell_labels(spec):
        raise ConfigError(f"{where}: exclude leaves no cell to run")


def cell_labels(spec: GridSpec) -> list[dict]:
    """The labels of the grid's cells (category, noise, overlap, seed, method) that ``exclude``
    leaves in, in the grid file's order."""
    return [labels for labels in _all_labels(spec) if not _excluded(spec, labels)]


def _all_labels(spec: GridSpec):
    values = label_values(spec)
    for cell in itertools.product(*values.values()):
        yield dict(zip(values, cell, strict=True))


def _excluded(spec: GridSpec, labels: dict) -> bool:
    return any(all(_same(labels[key], value) for key, value in entry.items()) for entry in spec.exclude)


def _same(a, b) -> bool:
    """Equal, with a YAML boolean never equal to a number (``seed: true`` is not seed 1; ``noise: 0``
    is the grid's 0.0)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


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


def method_configs(spec: GridSpec, base: Config) -> dict[str, Config]:
    """Each of the grid's methods' config: its overrides applied to ``base``; a misspelt method
    override is a ``ConfigError`` naming the method and the key before any trial starts."""
    configs = {}
    for method, overrides in spec.methods.items():
        try:
            configs[method] = with_overrides(base, overrides)
        except ConfigError as error:
            raise ConfigError(f"grid method {method!r}: {error}") from error
    return configs


def method_costs(spec: GridSpec, base: Config) -> dict[str, int]:
    """``trial_cost`` of each of the grid's methods (``method_configs``, which checks them)."""
    return {method: trial_cost(config) for method, config in method_configs(spec, base).items()}


def grid_record(spec: GridSpec, base: Config) -> dict:
    """``experiment_record`` of a grid: its base config (less the data path, category and seed each
    cell sets) and its methods, categories, noise ratios, overlaps and seeds, and its ``exclude`` when
    it has one (so a grid started before ``exclude`` existed still resumes)."""
    cells_of = {k: getattr(spec, k) for k in ("methods", "categories", "noise_ratios", "overlap", "seeds")}
    if spec.exclude:
        cells_of["exclude"] = spec.exclude
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
    """One Tune trial per (category, noise, overlap, seed, method) that ``spec.exclude`` leaves in;
    with ``costs`` (``method_costs``) the costliest methods' trials come first (Tune starts a grid's
    trials in this order), ties in the grid file's order."""
    cells = []
    for labels in cell_labels(spec):
        overrides = [
            *spec.methods[labels["method"]],
            f"data.path={stores[(labels['noise'], labels['overlap'], labels['seed'])]}",
            f"data.category={labels['category']}",
            f"train.seed={labels['seed']}",
        ]
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
    """Rows per (method, noise, overlap), columns per category plus the mean; cells 'mean ± std',
    '-' where the row has no such cell (its mean is then marked '*': over fewer categories)."""
    metric = "image_auroc"
    lines = []
    categories = sorted(summary["category"].unique())
    header = "| method | noise | overlap | " + " | ".join(categories) + " | mean |"
    lines += [f"{metric} (mean ± std over seeds)", "", header, "|" + "---|" * (len(categories) + 4)]
    rows = summary.sort_values(["noise", "method"], key=lambda c: c if c.name == "noise" else c != "rd")
    reference = rows[(rows["method"] == "rd") & (rows["noise"] == 0)]
    ordered = pd.concat([reference, rows.drop(reference.index)])
    partial = False
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
        mean = f"{part[f'{metric}_mean'].mean():.3f}"
        if len(part) < len(categories):  # cells left out (exclude) or failed: not the other rows' mean
            mean += "*"
            partial = True
        lines.append(f"| {label} | {noise:g} | {overlap} | " + " | ".join(cells) + f" | {mean} |")
    if partial:
        lines += [
            "",
            "\\* the mean over the categories the row has (its other cells were left out or failed)",
        ]
    return "\n".join(lines) + "\n"


def run_grid(
    spec: GridSpec, resume: bool = False, console: Console | None = None, print_table: bool = True
) -> dict:
    console = console or Console()
    grid_dir = experiment_dir(spec)
    check_exclude(spec)
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
