"""AUPRO speed and agreement: cdd-ray's exact one-sort AUPRO against a threshold-grid reference.

The reference is the obvious algorithm (what many public implementations do): for each of N evenly
spaced thresholds, binarize every map, count the false positives over normal pixels and each
region's overlap, then integrate PRO(FPR) up to 0.3. Both run on the same 100 maps of 256x256 with
blob-shaped masks, side by side in one process; the figure that matters is the ratio.

Run: .venv/bin/python bench/aupro_speed.py [--maps 100] [--size 256] [--thresholds 1000]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from scipy import ndimage

from cdd_ray.evaluate.metrics import aupro, label_regions


def make_case(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, size, size), dtype=np.uint8)
    for index in range(count // 2):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 40, 2)
            h, w = rng.integers(5, 40, 2)
            masks[index, r : r + h, c : c + w] = 1
    noise = ndimage.gaussian_filter(rng.random((count, size, size)), (0, 4, 4))
    maps = noise + 0.05 * ndimage.gaussian_filter(masks.astype(float), (0, 3, 3))
    return maps.astype(np.float32), masks


def reference_grid_aupro(maps: np.ndarray, masks: np.ndarray, thresholds: int, limit: float = 0.3) -> float:
    regions, count = label_regions(masks)
    flat_regions = regions.ravel()
    sizes = np.bincount(flat_regions, minlength=count + 1)[1:]
    normal = flat_regions == 0
    values = maps.ravel()
    fprs, pros = [], []
    for threshold in np.linspace(values.max(), values.min(), thresholds):
        above = values >= threshold
        fprs.append((above & normal).sum() / normal.sum())
        hits = np.bincount(flat_regions[above], minlength=count + 1)[1:]
        pros.append(np.mean(hits / sizes))
    fpr, pro = np.array([0.0, *fprs]), np.array([0.0, *pros])
    inside = fpr <= limit
    x = np.append(fpr[inside], limit)
    y = np.append(pro[inside], np.interp(limit, fpr, pro))
    return float(np.trapezoid(y, x) / limit)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--maps", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--thresholds", type=int, default=1000)
    args = parser.parse_args()
    maps, masks = make_case(args.maps, args.size)
    started = time.perf_counter()
    ours = aupro(maps, masks)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    reference = reference_grid_aupro(maps, masks, args.thresholds)
    reference_s = time.perf_counter() - started
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {args.maps} maps of {args.size}x{args.size}")
    print(f"cdd-ray exact AUPRO:      {ours:.5f} in {ours_s:.2f} s")
    print(f"reference ({args.thresholds} thresholds): {reference:.5f} in {reference_s:.2f} s")
    print(f"speed-up: {reference_s / ours_s:.1f}x, |difference|: {abs(ours - reference):.2e}")


if __name__ == "__main__":
    main()
