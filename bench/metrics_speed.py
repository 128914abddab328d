"""Pixel metrics from one sort against scikit-learn's two more: speed and agreement.

``compute_metrics`` sorts the pixel scores once (``Ranking``) and reads pixel AUROC, F1-max and the
PRO curve from that order. Before, pixel AUROC came from scikit-learn's ``roc_auc_score`` and F1-max
from its ``precision_recall_curve``, each sorting the pixel scores again (a stable sort, on float64
copies). Both paths run on the same maps (``aupro_speed.make_case``: blob masks on half the maps,
float32 scores as detectors give them), alternating, in one process; the ratio is the figure.

Run: .venv/bin/python bench/metrics_speed.py [--maps 130] [--sizes 128 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from aupro_speed import make_case  # bench/ is on sys.path when run as a script
from sklearn.metrics import precision_recall_curve, roc_auc_score

from cdd_ray.evaluate.metrics import aupro_of_curve, compute_metrics, pro_curve


def scikit_learn_path(maps: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """The pixel metrics as computed before: three sorts of the pixel scores."""
    labels, scores = masks.ravel(), maps.ravel()
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    best = int(np.argmax(f1[:-1]))
    return {
        "pixel_auroc": float(roc_auc_score(labels, scores)),
        "pixel_f1_max": float(f1[best]),
        "pixel_threshold": float(thresholds[best]),
        "aupro": aupro_of_curve(*pro_curve(maps, masks), 0.3),
    }


def one_sort_path(maps: np.ndarray, masks: np.ndarray, image_scores, image_labels) -> dict[str, float]:
    return compute_metrics(image_scores, image_labels, maps, masks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--maps", type=int, default=130)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.machine()}, {args.maps} maps, seconds per call (best of {args.repeats})\n")
    print("| maps | pixels | scikit-learn path | one sort | ratio | largest difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        maps, masks = make_case(args.maps, size)
        maps = maps.astype(np.float32)
        image_labels = masks.reshape(len(masks), -1).max(1)
        image_scores = maps.reshape(len(maps), -1).max(1)
        times: dict[str, list[float]] = {"sklearn": [], "one": []}
        for _ in range(args.repeats):
            started = time.perf_counter()
            before = scikit_learn_path(maps, masks)
            times["sklearn"].append(time.perf_counter() - started)
            started = time.perf_counter()
            after = one_sort_path(maps, masks, image_scores, image_labels)
            times["one"].append(time.perf_counter() - started)
        difference = max(abs(before[k] - after[k]) for k in before)
        old, new = min(times["sklearn"]), min(times["one"])
        print(
            f"| {args.maps} x {size}x{size} | {maps.size:,} | {old:.2f} | {new:.2f} | {old / new:.1f}x "
            f"| {difference:.1e} |"
        )


if __name__ == "__main__":
    main()
