"""Probe: a memory bank cleaned by cross-domain distillation scores (photo benchmark, in-process).

CDD trains one domain student per domain; a domain student never saw the images of the other
domains, so its anomaly map of such an image is an out-of-sample anomaly score of that training image,
patch by patch. This probe drops from PatchCore's memory bank the training patches that the other
domain's student finds most anomalous (each share of ``--drops``, as SoftPatch drops its most isolated
patches), then builds the coreset of the rest and scores the test set as PatchCore does. Side by
side in every cell (category, seed), on the same teacher and features:

- ``patchcore``: the bank of all training patches;
- ``softpatch``: the product's SoftPatch (LOF per position, 15 % dropped, soft weights);
- ``xd{drop}``: the bank without that share of patches with the highest cross-domain score (no
  soft weights, unlike SoftPatch);
- ``cdd``: the CDD detector itself (its global student), for reference.

Cross-domain score of a training image of domain d: the mean over the other domains' students of
their anomaly maps (the product's scoring: cos + l2 distances, each student's own training means,
Gaussian blur), average-pooled to PatchCore's patch grid. Not a product path: a probe to decide
whether a CDD-cleaned bank is worth building.

Run: .venv/bin/python bench/cross_domain_bank.py --out bench_out/xd_overlap.jsonl --setting overlap \
         --noise 0.2
     .venv/bin/python bench/cross_domain_bank.py --out bench_out/xd_overlap.jsonl --report
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_cells import add_cell_arguments, cells_by_setting, fit_cdd_cell, run_cells  # noqa: E402
from quality_grid import mean_std  # noqa: E402

from cdd_ray.evaluate.metrics import compute_metrics  # noqa: E402
from cdd_ray.models.detector import (  # noqa: E402
    PatchCoreDetector,
    distance_scale,
    distillation_detector,
    score_in_batches,
)
from cdd_ray.models.patchcore.coreset import coreset_size, greedy_coreset  # noqa: E402
from cdd_ray.models.patchcore.memory_bank import MemoryBank  # noqa: E402
from cdd_ray.models.patchcore.model import build_memory_bank  # noqa: E402
from cdd_ray.models.patchcore.softpatch import keep_mask  # noqa: E402
from cdd_ray.train.fit import training_patch_features  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def cross_domain_maps(config, teacher, engine, images, domains) -> torch.Tensor:
    """(N, S, S) anomaly map of each training image by the students of the domains it is not in."""
    students = engine.all_domain_students()
    maps = torch.zeros(len(images), *images.shape[-2:])
    counts = torch.zeros(len(images))
    for k, student in enumerate(students):
        student.eval()
        own = torch.as_tensor(np.flatnonzero(domains == k))
        others = torch.as_tensor(np.flatnonzero(domains != k))
        scale = distance_scale(teacher, student, images[own])
        detector = distillation_detector(teacher, student, config.eval, scale)
        with torch.no_grad():
            other_maps, _ = score_in_batches(detector, images[others])
        maps[others] += other_maps
        counts[others] += 1
    return maps / counts.view(-1, 1, 1)


def cleaned_bank(features: torch.Tensor, scores: torch.Tensor, config, drop: float, seed: int) -> MemoryBank:
    """PatchCore's bank of the patches (N, D, h, w) without the ``drop`` share of the highest
    ``scores`` (N, h, w)."""
    count, dim, height, width = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, dim)
    allowed = keep_mask(scores.reshape(count, -1), drop).flatten()
    size = coreset_size(int(allowed.sum()), config.memory_bank.coreset_ratio)
    chosen = greedy_coreset(flat, size, seed, config.memory_bank.projection_dim, allowed)
    return MemoryBank(flat[chosen].float().contiguous(), None, (height, width))


def evaluate(detector, test) -> dict:
    maps, scores = score_in_batches(detector, test["images"])
    metrics = compute_metrics(scores.numpy(), test["labels"], maps.numpy(), test["masks"])
    return {m: round(float(metrics[m]), 4) for m in METRICS}


def run_cell(teacher, store: Path, category: str, seed: int, args) -> dict:
    started = time.perf_counter()
    config, train, test, cdd, info, rows = fit_cdd_cell(teacher, store, category, seed, args)
    engine, domains = info["engine"], np.asarray(info["domains"])
    images = train["images"][rows]
    results = {"cdd": evaluate(cdd, test)}
    trained = time.perf_counter() - started

    features = training_patch_features(teacher, images)
    maps = cross_domain_maps(config, teacher, engine, images, domains)
    scores = F.adaptive_avg_pool2d(maps.unsqueeze(1), features.shape[-2:]).squeeze(1)
    injected = torch.as_tensor(train["injected"], dtype=torch.bool)[rows]
    # how well the cross-domain image score (the mean of the patch scores) finds the injected images
    image_scores = scores.flatten(1).mean(1)
    if injected.any() and (~injected).any():
        from sklearn.metrics import roc_auc_score

        results["injected_auroc"] = round(float(roc_auc_score(injected.numpy(), image_scores.numpy())), 4)
    for method in ("patchcore", "softpatch"):
        bank, _ = build_memory_bank(features, config.memory_bank, denoise=method == "softpatch", seed=seed)
        detector = PatchCoreDetector(teacher, bank, config.memory_bank, config.eval.sigma)
        results[method] = evaluate(detector, test)
    for drop in args.drops:
        bank = cleaned_bank(features, scores, config, drop, seed)
        detector = PatchCoreDetector(teacher, bank, config.memory_bank, config.eval.sigma)
        results[f"xd{drop:g}"] = evaluate(detector, test)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["train_seconds"] = round(trained, 1)
    results["injected_in_train"] = int(injected.sum())
    return results


def report(paths: list[str]) -> None:
    for setting, cells in cells_by_setting(paths).items():
        methods = [m for m in cells[0] if isinstance(cells[0][m], dict) and "image_auroc" in cells[0][m]]
        print(f"\n{setting}: {len(cells)} cells; image AUROC: mean +- std over seeds of the category mean")
        print("| method | image AUROC | worst run | pixel AUROC | AUPRO | paired vs softpatch | worst cell |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        seeds = sorted({c["seed"] for c in cells})
        for method in methods:
            per_seed = [np.mean([c[method]["image_auroc"] for c in cells if c["seed"] == s]) for s in seeds]
            worst = min(cells, key=lambda c: c[method]["image_auroc"])
            diffs = [c[method]["image_auroc"] - c["softpatch"]["image_auroc"] for c in cells]
            pixel = np.mean([c[method]["pixel_auroc"] for c in cells])
            aupro = np.mean([c[method]["aupro"] for c in cells])
            print(
                f"| {method} | {mean_std(per_seed)} | "
                f"{worst[method]['image_auroc']:.3f} ({worst['category']}, s{worst['seed']}) | {pixel:.3f} | "
                f"{aupro:.3f} | {mean_std(diffs, signed=True)} | {min(diffs):+.3f} |"
            )
        found = [c["injected_auroc"] for c in cells if "injected_auroc" in c]
        if found:
            print(f"cross-domain image score finds the injected training images: AUROC {np.mean(found):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_cell_arguments(parser)
    parser.add_argument("--drops", type=float, nargs="+", default=[0.15])
    args = parser.parse_args()
    if args.domains < 2:
        parser.error("--domains must be >= 2: a training image needs a domain student that never saw it")
    if args.report:
        report(args.out)
        return

    def shown(row: dict) -> tuple:
        return {m: v["image_auroc"] for m, v in row.items() if isinstance(v, dict)}, row.get("injected_auroc")

    run_cells(args, run_cell, "|drops" + "-".join(f"{d:g}" for d in args.drops), shown)


if __name__ == "__main__":
    main()
