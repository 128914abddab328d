"""Probe: late fusion of CDD's and SoftPatch's image scores (photo benchmark, in-process).

CDD and SoftPatch fail in different places (CDD's student misses small low-contrast defects and
raises false alarms at the border; SoftPatch's memory bank keeps anomalous patches that escaped its
outlier filter, and under overlap they match the very test anomalies). If their errors are
independent enough, one score made of both beats each. The two scores live on different scales, so
each is first normalized by statistics of NORMAL-ish data that a user has without labels: the
(contaminated) training set.

Per cell (category, seed), on the same teacher and training images, this probe stores every image
score needed and fuses them in ``--report`` (no retraining to try another rule):

- test image scores of ``cdd`` (the shipped CDD path, ``fit_detector``), ``softpatch`` and
  ``patchcore`` (the product's banks);
- training image scores for the normalization: CDD's global student on its own training images
  (in-sample), SoftPatch's full bank on them (in-sample: a training patch that is in the coreset
  matches itself), and SoftPatch and PatchCore out-of-sample: a bank built on the other domain's
  images scores each domain's images (leave-one-domain-out, CDD's own domains).

Normalizations compared in the report (each maps a detector's score s to a comparable number):

- ``z``: (s - median) / (1.4826 MAD) of the training scores (robust to a contaminated minority);
- ``cdf``: share of training scores below s (empirical CDF), ties at the ends kept apart by z;
- ``rank`` (transductive reference, not deployable one image at a time): rank within the test set.

Fused score: the mean of the two normalized scores; CDD with SoftPatch (``fuse_*``) and, in cells
recorded from 2026-12-02 (afternoon) on, CDD with PatchCore (``fuse_pc_*``, PatchCore's training
scores always out of sample, ``patchcore_held_out``: in sample its bank holds each training
image's own patches). An out-of-sample bank holds half the images (K = 2), so its training scores
sit higher than the full bank's test scores would on the same images: the normalized test scores
are shifted and the two detectors reweighted a little. Not a product path: a probe to decide
whether a fused detector is worth shipping.

Run: .venv/bin/python bench/score_fusion.py --out bench_out/fusion_overlap.jsonl --setting overlap --noise 0.2
     .venv/bin/python bench/score_fusion.py --out bench_out/fusion_*.jsonl --report
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_cells import add_cell_arguments, cells_by_setting, fit_cdd_cell, run_cells  # noqa: E402
from quality_grid import mean_std  # noqa: E402

from cdd_ray.evaluate.metrics import auroc  # noqa: E402
from cdd_ray.models.detector import PatchCoreDetector, score_in_batches  # noqa: E402
from cdd_ray.models.patchcore.model import build_memory_bank  # noqa: E402
from cdd_ray.train.fit import training_patch_features  # noqa: E402


def image_scores(detector, images: torch.Tensor) -> list[float]:
    with torch.no_grad():
        _, scores = score_in_batches(detector, images)
    return [round(float(s), 6) for s in scores]


def bank_detector(teacher, features, config, denoise: bool, seed: int) -> PatchCoreDetector:
    bank, _ = build_memory_bank(features, config.memory_bank, denoise=denoise, seed=seed)
    return PatchCoreDetector(teacher, bank, config.memory_bank, config.eval.sigma)


def run_cell(teacher, store: Path, category: str, seed: int, args) -> dict:
    started = time.perf_counter()
    config, train, test, cdd, info, rows = fit_cdd_cell(teacher, store, category, seed, args)
    images, domains = train["images"][rows], np.asarray(info["domains"])
    features = training_patch_features(teacher, images)
    softpatch = bank_detector(teacher, features, config, True, seed)
    patchcore = bank_detector(teacher, features, config, False, seed)
    # out of sample: each domain's images scored by a bank (SoftPatch's, PatchCore's) of the other
    # domains' images; PatchCore in-sample would score a training image against its own patches
    held_out = {"softpatch_held_out": np.zeros(len(images)), "patchcore_held_out": np.zeros(len(images))}
    for k in range(args.domains):
        own = np.flatnonzero(domains == k)
        others = torch.as_tensor(np.flatnonzero(domains != k))
        for name, denoise in (("softpatch_held_out", True), ("patchcore_held_out", False)):
            other = bank_detector(teacher, features[others], config, denoise, seed)
            held_out[name][own] = image_scores(other, images[torch.as_tensor(own)])
    return {
        "test_labels": [int(v) for v in test["labels"]],
        "test": {
            "cdd": image_scores(cdd, test["images"]),
            "softpatch": image_scores(softpatch, test["images"]),
            "patchcore": image_scores(patchcore, test["images"]),
        },
        "train_injected": [bool(v) for v in np.asarray(train["injected"])[rows.numpy()]],
        "train": {
            "cdd": image_scores(cdd, images),
            "softpatch": image_scores(softpatch, images),
            **{name: [round(float(s), 6) for s in scores] for name, scores in held_out.items()},
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def robust_z(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(s - median) / (1.4826 * MAD) of ``reference``; the MAD floored to keep a constant reference finite."""
    median = np.median(reference)
    mad = 1.4826 * np.median(np.abs(reference - median))
    return (scores - median) / max(mad, 1e-12)


def empirical_cdf(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Share of ``reference`` at or below each score, plus 1e-3 times the robust z (which orders
    scores beyond the reference's range, and may reorder scores within one CDF step)."""
    ordered = np.sort(reference)
    return np.searchsorted(ordered, scores, side="right") / len(ordered) + 1e-3 * robust_z(scores, reference)


def rank_in_test_set(scores: np.ndarray, _reference: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(scores)) / (len(scores) - 1)


NORMALIZERS = {"z": robust_z, "cdf": empirical_cdf, "rank": rank_in_test_set}
# which training scores normalize SoftPatch: in-sample (its own bank) or leave-one-domain-out
SOFTPATCH_REFERENCES = ("softpatch", "softpatch_held_out")


def fused_aurocs(cell: dict) -> dict[str, float]:
    labels = np.asarray(cell["test_labels"])
    test = {m: np.asarray(v) for m, v in cell["test"].items()}
    train = {m: np.asarray(v) for m, v in cell["train"].items()}
    out = {m: auroc(s, labels) for m, s in test.items()}
    for name, normalize in NORMALIZERS.items():
        cdd = normalize(test["cdd"], train["cdd"])
        for reference in SOFTPATCH_REFERENCES:
            if name == "rank" and reference != "softpatch":
                continue  # rank ignores the training scores
            soft = normalize(test["softpatch"], train[reference])
            suffix = "" if reference == "softpatch" else "_ho"
            out[f"fuse_{name}{suffix}"] = auroc((cdd + soft) / 2, labels)
        if "patchcore_held_out" in train:  # cells recorded from 2026-12-02 (afternoon) on
            # PatchCore's training scores out of sample only; rank uses none
            patch = normalize(test["patchcore"], train["patchcore_held_out"])
            out[f"fuse_pc_{name}" + ("" if name == "rank" else "_ho")] = auroc((cdd + patch) / 2, labels)
    return out


def report(paths: list[str]) -> None:
    """Per setting: each score's mean +- std over seeds (of the category mean), its worst run, and
    its difference from each single detector paired per seed (mean over categories, then over
    seeds), with the worst single cell against SoftPatch."""
    singles = ("cdd", "softpatch", "patchcore")
    for setting, cells in cells_by_setting(paths).items():
        results = [fused_aurocs(c) for c in cells]
        seeds = sorted({c["seed"] for c in cells})

        def per_seed(method: str, minus: str | None = None, results=results, cells=cells, seeds=seeds):
            """Per seed: the mean over its categories of ``method`` (minus ``minus``)."""
            differences = [r[method] - (r[minus] if minus else 0.0) for r in results]
            by_seed = [[d for d, c in zip(differences, cells, strict=True) if c["seed"] == s] for s in seeds]
            return [np.mean(values) for values in by_seed]

        print(f"\n{setting}: {len(cells)} cells; image AUROC: mean +- std over seeds of the category mean")
        print(
            "| score | image AUROC | worst run | per seed vs "
            + " | per seed vs ".join(singles)
            + " | worst cell vs softpatch |"
        )
        print("|---|---:|---:|" + "---:|" * (len(singles) + 1))
        for method in results[0]:
            worst = min(range(len(cells)), key=lambda i: results[i][method])
            paired = " | ".join(mean_std(per_seed(method, m), signed=True) for m in singles)
            soft = [r[method] - r["softpatch"] for r in results]
            print(
                f"| {method} | {mean_std(per_seed(method))} | {results[worst][method]:.3f} "
                f"({cells[worst]['category']}, s{cells[worst]['seed']}) | {paired} | {min(soft):+.3f} |"
            )
        correlation = [
            np.corrcoef(np.asarray(c["test"]["cdd"]), np.asarray(c["test"]["softpatch"]))[0, 1] for c in cells
        ]
        print(f"correlation of the CDD and SoftPatch test scores: {np.mean(correlation):.2f} (cell mean)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_cell_arguments(parser)
    args = parser.parse_args()
    if args.domains < 2:
        parser.error("--domains must be >= 2: SoftPatch's held-out scores use the other domains' bank")
    if args.report:
        report(args.out)
        return
    run_cells(args, run_cell, "", lambda row: {m: round(v, 4) for m, v in fused_aurocs(row).items()})


if __name__ == "__main__":
    main()
