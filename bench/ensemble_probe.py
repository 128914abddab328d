"""Probe: an ensemble of students, each trained alone with its own seed, their maps averaged.

RD's false alarms on normal images are errors of reproduction: where a student fails to reproduce
the teacher on a normal image depends on its seed (one run's image AUROC moves by 0.02-0.03 with
the seed, or even with the order of floating-point sums), while a defect is there for every
student. Averaging the anomaly maps of M students keeps what they agree on. The Uninformed
Students of Bergmann et al. (CVPR 2020) score with an ensemble of students for the same reason.

Each cell trains ``--members`` students through the shipped path (``fit_detector``; RD with
``--domains 1``, CDD with ``--domains 2``; ``train.seed`` = seed + 1000 * m for member m, so
member 0 is the shipped run of that seed) and scores the test set with each (the shipped
read-out, test-time flips included). Read-outs, image AUROC per cell:

- ``single``: member 0 alone (what one shipped run gives);
- ``member_mean``: the mean of the members' AUROCs (a single run's expected figure, whatever seed);
- ``ens2`` / ``ens3`` / ...: the mean map of the first 2, 3, ... members, then the product's
  image score (top 1 % of the map).

Cost: M trainings and M scorings per image (M times a run).

Run: .venv/bin/python bench/ensemble_probe.py --out bench_out/ensemble_rd_clean.jsonl --domains 1
     .venv/bin/python bench/ensemble_probe.py --out bench_out/ensemble_*.jsonl --report
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_cells import add_cell_arguments, fit_cdd_cell, report_readouts, run_cells  # noqa: E402

from cdd_ray.evaluate.metrics import auroc  # noqa: E402
from cdd_ray.models.anomaly_map import image_scores  # noqa: E402
from cdd_ray.models.detector import score_in_batches  # noqa: E402

SEED_STEP = 1000


def run_cell(teacher, store: Path, category: str, seed: int, args) -> dict:
    started = time.perf_counter()
    maps, members = [], []
    for member in range(args.members):
        config, _, test, detector, _, _ = fit_cdd_cell(
            teacher, store, category, seed, args, (f"train.seed={seed + SEED_STEP * member}",)
        )
        with torch.no_grad():
            member_maps, member_scores = score_in_batches(detector, test["images"])
        maps.append(member_maps)
        members.append(round(auroc(member_scores.numpy(), test["labels"]), 4))
    result = {"single": members[0], "member_mean": round(float(np.mean(members)), 4)}
    for m in range(2, args.members + 1):
        scores = image_scores(torch.stack(maps[:m]).mean(0), config.eval.top_fraction).numpy()
        result[f"ens{m}"] = round(auroc(scores, test["labels"]), 4)
    return {"auroc": result, "members": members, "seconds": round(time.perf_counter() - started, 1)}


def report(paths: list[str]) -> None:
    def worst_member(cells: list[dict]) -> str:
        return f"worst single member over these cells: {min(min(c['members']) for c in cells):.3f}"

    report_readouts(paths, "single", worst_member)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_cell_arguments(parser)
    parser.add_argument("--members", type=int, default=3, help="students per cell (>= 2)")
    args = parser.parse_args()
    if args.report:
        report(args.out)
        return
    if args.members < 2:
        parser.error("--members must be at least 2")
    run_cells(args, run_cell, f"|ensemble{args.members}", lambda row: row["auroc"])


if __name__ == "__main__":
    main()
