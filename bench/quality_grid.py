"""Detection quality under contamination: RD against CDD with the controls that separate robustness
to contamination from other effects, in-process (the same CDDEngine steps the Ray workers run).

Studies (``--study``):
- ``main``: every category x noise ratio x seed, methods
    rd        plain RD (K = 1), E epochs
    rd_steps  plain RD with CDD's optimizer steps: 2E epochs (K=2 domain students see N/B batches per
              epoch together, the global student another N/B)
    cdd       CDD, K = 2, the first defaults (random partition, mean aggregation, no gating,
              lambda_teacher = lambda_cross = 1, schedule alternate)
  noise 0 gives the "clean" rows (RD clean, CDD clean).
- ``followup``: the ablation's best settings together (lambda_teacher = 2, schedule sequential) with
  K = 2 and K = 3, on the main study's grid (same stores and seeds: report it next to ``main``).
- ``concentrated``: noise 0.2 drawn from ONE defect type per category, RD against CDD with each
  partition strategy (random, cluster, outlier); records the injected share of every domain.
- ``ablation``: one category and noise ratio; K, lambda_teacher / lambda_cross, gating and its
  temperature, aggregation, schedule, each varied alone from the CDD defaults.

Every finished cell is appended to a JSON-lines file, so an interrupted run resumes where it stopped
(``--out`` the same file). ``--report`` prints the Markdown tables (mean +- std over seeds).

Run: .venv/bin/python bench/quality_grid.py --study main --out bench_out/main.jsonl [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from synthetic_quality import load  # bench/ is on sys.path when run as a script

from cdd_ray.data.domains import assign_domains, domain_report
from cdd_ray.data.prepare import prepare
from cdd_ray.data.store import SAMPLES_FILE
from cdd_ray.data.synthetic import CATEGORIES, DEFECTS
from cdd_ray.evaluate.metrics import compute_metrics
from cdd_ray.models.detector import DistillationDetector, score_in_batches
from cdd_ray.models.distillation.losses import ObjectiveConfig
from cdd_ray.models.distillation.student import student_spec
from cdd_ray.models.teacher import TeacherConfig, build_teacher, pooled_embedding
from cdd_ray.train.engine import CDDEngine, OptimConfig, fit_in_process

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_cell(teacher, train: dict, test: dict, cell: dict, epochs: int, size: int) -> dict:
    """Train one configuration on ``train``, score ``test``; returns metrics and bookkeeping."""
    k = cell["k"]
    started = time.perf_counter()
    if k > 1:
        vectors = None
        if cell["partition"] != "random":
            with torch.no_grad():
                vectors = pooled_embedding(teacher(train["images"])).numpy()
        domains = assign_domains(train["ids"], cell["partition"], k, seed=cell["seed"], embeddings=vectors)
        shares = [round(r["injected_share"], 3) for r in domain_report(domains, train["injected"], k)]
    else:
        domains, shares = np.zeros(len(train["ids"]), dtype=np.int64), []
    spec = student_spec(teacher.channels, teacher.reductions, "tf_efficientnet_lite0")
    engine = CDDEngine.create(
        teacher,
        spec,
        k,
        cell["objective"],
        OptimConfig(),
        seed=cell["seed"],
        excluded_sources=cell.get("excluded_sources", ()),
    )
    steps = []
    fit_in_process(
        engine,
        train["images"],
        torch.as_tensor(domains, dtype=torch.long),
        cell["epochs"],
        batch_size=16,
        seed=cell["seed"],
        teacher_cache=True,
        on_step=lambda *_: steps.append(1),
        schedule=cell.get("schedule", "alternate"),
    )
    maps, scores = score_in_batches(DistillationDetector(teacher, engine.global_student), test["images"])
    metrics = compute_metrics(scores.numpy(), test["labels"], maps.numpy(), test["masks"])
    return {
        **{m: round(float(metrics[m]), 4) for m in METRICS},
        "optimizer_steps": len(steps),
        "domain_injected_share": shares,
        "seconds": round(time.perf_counter() - started, 1),
    }


def cells(study: str, args) -> list[dict]:
    """Every configuration of a study, each with the key that identifies it in the results file."""
    # the first shipped defaults (lambda_teacher 1, schedule alternate), which these studies vary;
    # spelled out so that the recorded results stay reproducible when the defaults move
    base = ObjectiveConfig(lambda_cross=1.0, lambda_teacher=1.0, gating=False, aggregation="mean")
    out = []
    if study in ("main", "followup"):
        if study == "main":
            methods = {
                "rd": dict(k=1, epochs=args.epochs),
                "rd_steps": dict(k=1, epochs=2 * args.epochs),
                "cdd": dict(k=2, epochs=args.epochs),
            }
        else:  # the ablation's two strongest single changes together, before they became defaults
            tuned = replace(base, lambda_teacher=2.0)
            methods = {
                "cdd_t2_seq": dict(k=2, objective=tuned, schedule="sequential", epochs=args.epochs),
                "cdd_t2_seq_k3": dict(k=3, objective=tuned, schedule="sequential", epochs=args.epochs),
            }
        for noise in args.noise:
            for seed in args.seeds:
                for category in args.categories:
                    for method, spec in methods.items():
                        out.append(dict(category=category, noise=noise, seed=seed, method=method, **spec))
    elif study == "concentrated":
        for seed in args.seeds:
            for category in args.categories:
                out.append(
                    dict(category=category, noise=0.2, seed=seed, method="rd", k=1, epochs=args.epochs)
                )
                for partition in ("random", "cluster", "outlier"):
                    out.append(
                        dict(
                            category=category,
                            noise=0.2,
                            seed=seed,
                            method=f"cdd_{partition}",
                            k=2,
                            epochs=args.epochs,
                            partition=partition,
                        )
                    )
                # K = 3 outlier: domain 0 holds the suspicious third; "trusted" keeps its student out
                # of every image's pseudo-normal targets (clean domains learn only from each other)
                for method, excluded in (("cdd_outlier_k3", ()), ("cdd_outlier_k3_trusted", (0,))):
                    out.append(
                        dict(
                            category=category,
                            noise=0.2,
                            seed=seed,
                            method=method,
                            k=3,
                            epochs=args.epochs,
                            partition="outlier",
                            excluded_sources=excluded,
                        )
                    )
    elif study == "ablation":
        variants = {"cdd K=2 (defaults)": dict(k=2)}
        variants |= {f"K={k}": dict(k=k) for k in (1, 3, 4, 6)}
        variants |= {
            f"lambda_teacher/lambda_cross={r}": dict(k=2, objective=replace(base, lambda_teacher=r))
            for r in (0.0, 0.5, 2.0)
        }
        variants |= {
            f"gating T={t}": dict(k=2, objective=replace(base, gating=True, gating_temperature=t))
            for t in (0.1, 0.5, 2.0)
        }
        variants["aggregation=median"] = dict(k=3, objective=replace(base, aggregation="median"))
        variants["K=3 mean (median's reference)"] = dict(k=3)
        variants["schedule=sequential"] = dict(k=2, schedule="sequential")
        for seed in args.seeds:
            for category in args.categories:
                for method, spec in variants.items():
                    out.append(
                        dict(
                            category=category,
                            noise=args.noise[0],
                            seed=seed,
                            method=method,
                            epochs=args.epochs,
                            **spec,
                        )
                    )
    for cell in out:
        cell.setdefault("partition", "random")
        cell.setdefault("objective", base)
        cell["key"] = (
            f"{study}|{cell['category']}|{cell['noise']}|{cell['seed']}|{cell['method']}|{cell['epochs']}"
        )
    return out


def store_for(work: Path, noise: float, seed: int, concentrated: bool) -> dict:
    """Prepared store per (noise, seed[, concentrated]) holding every category, so a run over fewer
    categories (``--categories``) reuses the same images and the same injected set."""
    categories = sorted(CATEGORIES)
    path = work / f"store-{noise}-{seed}-{'conc' if concentrated else 'all'}-{'+'.join(categories)}"
    if concentrated:
        # one defect type per category: the first of each category's list
        for category in categories:
            if not (path / category / SAMPLES_FILE).is_file():
                prepare(
                    "synthetic",
                    None,
                    path / category,
                    [category],
                    noise_ratio=noise,
                    seed=seed,
                    defect_types=[DEFECTS[category][0]],
                )
        return {c: path / c for c in categories}
    if not (path / SAMPLES_FILE).is_file():
        prepare("synthetic", None, path, categories, noise_ratio=noise, seed=seed)
    return {c: path for c in categories}


def run(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["key"] for line in out.read_text().splitlines()} if out.is_file() else set()
    todo = [
        c
        for c in cells(args.study, args)
        if c["key"] not in done and (not args.methods or c["method"] in args.methods)
    ]
    print(
        f"{platform.machine()}, torch threads {torch.get_num_threads()}, {len(done)} done, {len(todo)} to run"
    )
    teacher = build_teacher(TeacherConfig())
    work = Path(args.work or tempfile.mkdtemp(prefix="cddquality"))
    for i, cell in enumerate(todo):
        stores = store_for(work, cell["noise"], cell["seed"], args.study == "concentrated")
        store = stores[cell["category"]]
        train = load(store, cell["category"], "train", args.size)
        test = load(store, cell["category"], "test", args.size)
        torch.manual_seed(cell["seed"])
        result = run_cell(teacher, train, test, cell, cell["epochs"], args.size)
        row = {k: v for k, v in cell.items() if k != "objective"} | result
        row["objective"] = vars(cell["objective"])
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(
            f"[{i + 1}/{len(todo)}] {cell['key']}: "
            + " ".join(f"{m} {result[m]:.3f}" for m in METRICS)
            + f" ({result['seconds']} s) shares {result['domain_injected_share']}",
            flush=True,
        )


def mean_std(values: list[float], signed: bool = False) -> str:
    """``mean +- sample std`` to 3 decimals (std 0 for one value); ``signed`` shows the mean's sign."""
    spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):{'+' if signed else ''}.3f} +- {spread:.3f}"


def paired_differences(rows: list[dict], reference: str = "rd") -> None:
    """Method minus ``reference`` on the same (noise, category, seed) cell: mean +- std over cells."""
    by_cell = {(r["noise"], r["category"], r["seed"], r["method"]): r for r in rows}
    methods = sorted({r["method"] for r in rows} - {reference})
    print(f"\nPaired differences, method minus {reference} on the same (category, seed), mean +- std\n")
    print("| noise | method | cells | image AUROC | pixel AUROC | AUPRO |\n|---:|---|---:|---:|---:|---:|")
    for noise in sorted({r["noise"] for r in rows}):
        for method in methods:
            pairs = [
                (row, by_cell[(noise, c, s, reference)])
                for (n, c, s, m), row in by_cell.items()
                if n == noise and m == method and (noise, c, s, reference) in by_cell
            ]
            if not pairs:
                continue
            cells_ = [mean_std([a[m] - b[m] for a, b in pairs], signed=True) for m in METRICS]
            print(f"| {noise} | {method} | {len(pairs)} | " + " | ".join(cells_) + " |")


def report(paths: list[str], references: list[str]) -> None:
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines()]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["noise"], row["method"]), []).append(row)
    print("\nMean over categories, then mean +- std over seeds (n = seeds)\n")
    print("| noise | method | n | image AUROC | pixel AUROC | AUPRO |\n|---:|---|---:|---:|---:|---:|")
    for (noise, method), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        by_seed: dict[int, list[dict]] = {}
        for row in group:
            by_seed.setdefault(row["seed"], []).append(row)
        cells_ = [mean_std([np.mean([r[m] for r in rs]) for rs in by_seed.values()]) for m in METRICS]
        cats = len({r["category"] for r in group})
        print(f"| {noise} | {method} | {len(by_seed)} ({cats} cat.) | " + " | ".join(cells_) + " |")
    print("\nPer category, image AUROC mean +- std over seeds\n")
    categories = sorted({r["category"] for r in rows})
    print("| noise | method | " + " | ".join(categories) + " |\n|---:|---|" + "---:|" * len(categories))
    for (noise, method), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        values = []
        for category in categories:
            xs = [r["image_auroc"] for r in group if r["category"] == category]
            values.append(mean_std(xs) if xs else "-")
        print(f"| {noise} | {method} | " + " | ".join(values) + " |")
    for reference in references:
        paired_differences(rows, reference)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--study", choices=("main", "followup", "concentrated", "ablation"), default="main")
    parser.add_argument("--out", required=True, nargs="+", help="results file (--report: one or more)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.4, 0.2, 0.1])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--methods", nargs="+", help="run only these methods (names as in the results)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", help="folder for the prepared stores (kept between runs)")
    parser.add_argument("--report", action="store_true", help="print the tables of --out and exit")
    parser.add_argument("--reference", nargs="+", default=["rd"], help="--report: paired differences against")
    args = parser.parse_args()
    if args.report:
        report(args.out, args.reference)
    elif len(args.out) != 1:
        parser.error("--out takes one results file when running a study")
    else:
        args.out = args.out[0]
        run(args)


if __name__ == "__main__":
    main()
