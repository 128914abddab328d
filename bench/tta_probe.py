"""Probe: test-time augmentation of a distillation detector's anomaly map (photo benchmark, in-process).

A student's false alarms on a normal image are errors of reproduction that need not survive a
flip of the image, while a defect is there in every orientation. Each test image is scored as it
is and flipped (the map flipped back), and the maps are averaged before the image score (the
product's: top 1 % of the map). Nothing is retrained: one student per cell (the shipped path,
``fit_detector``, RD with ``--domains 1`` or CDD with ``--domains 2``), every read-out of it
side by side:

- ``plain``: the product's map;
- ``flips2``: the mean of the map and that of the horizontally flipped image;
- ``flips4``: the mean over no flip, horizontal, vertical and both (the four flips of a square);
- ``d4``: the mean over all eight symmetries of a square (the four flips, each transposed too).

Run: .venv/bin/python bench/tta_probe.py --out bench_out/tta_rd_clean.jsonl --domains 1
     .venv/bin/python bench/tta_probe.py --out bench_out/tta_*.jsonl --report
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_cells import add_cell_arguments, fit_cdd_cell, report_readouts, run_cells  # noqa: E402

from cdd_ray.evaluate.metrics import auroc  # noqa: E402
from cdd_ray.models.anomaly_map import image_scores  # noqa: E402
from cdd_ray.models.detector import score_in_batches  # noqa: E402
from cdd_ray.models.symmetry import apply, group_elements, undo  # noqa: E402

FLIPS, D4 = group_elements("flips"), group_elements("d4")  # the identity first
READOUTS = {"plain": D4[:1], "flips2": FLIPS[:2], "flips4": FLIPS, "d4": D4}


def run_cell(teacher, store: Path, category: str, seed: int, args) -> dict:
    started = time.perf_counter()
    # the detector scores each image once: the read-outs below average its maps
    config, _, test, detector, _, _ = fit_cdd_cell(
        teacher, store, category, seed, args, ("eval.test_time_augment=none",)
    )
    maps = {}
    for symmetry in D4:
        with torch.no_grad():
            symmetric, _ = score_in_batches(detector, apply(test["images"], symmetry))
        maps[symmetry] = undo(symmetric, symmetry)
    result = {}
    for readout, names in READOUTS.items():
        mean_map = torch.stack([maps[n] for n in names]).mean(0)
        scores = image_scores(mean_map, config.eval.top_fraction).numpy()
        result[readout] = round(auroc(scores, test["labels"]), 4)
    return {"auroc": result, "seconds": round(time.perf_counter() - started, 1)}


def report(paths: list[str]) -> None:
    report_readouts(paths, "plain")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_cell_arguments(parser)
    args = parser.parse_args()
    if args.report:
        report(args.out)
        return
    run_cells(args, run_cell, "", lambda row: row["auroc"])


if __name__ == "__main__":
    main()
