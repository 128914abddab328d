"""Run reports: metrics.json (mean and per category), a rich table, PNG overlays of anomaly maps.

Example::

    metrics = summarize(results, fpr_limit=0.3)
    write_json(run_dir / "metrics.json", metrics)
    print_metrics_table({"cdd": metrics})
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from cdd_ray.data.images import encode_png
from cdd_ray.data.store import write_atomic
from cdd_ray.evaluate.metrics import compute_metrics

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")


def summarize(results: dict[str, np.ndarray], fpr_limit: float = 0.3, curves: dict | None = None) -> dict:
    """``results`` holds category, label, score, map, mask arrays over the test set. A ``curves``
    dict receives each category's PRO curve (category -> (fpr, pro)) for the HTML report.

    A metric that cannot be computed (a category whose test set lacks normal or anomalous images,
    or anomalous images without any mask pixel) is left out, and ``not_computed`` says why."""
    if not results or not len(results["label"]):
        return {"per_category": {}, "num_test_images": 0, "not_computed": ["no test images to score"]}
    per_category, not_computed = {}, []
    for category in sorted(set(results["category"].tolist())):
        rows = results["category"] == category
        labels = results["label"][rows]
        present = set(labels.tolist())
        if present != {0, 1}:
            kind = "anomalous" if present == {1} else "normal"
            not_computed.append(
                f"{category}: no metric, its test set has only {kind} images ({int(rows.sum())}); "
                "AUROC and F1 need both (did the noise ratio move every anomaly into training?)"
            )
            per_category[category] = {}
            continue
        has_pixels = bool(results["mask"][rows].any())
        if not has_pixels:
            not_computed.append(f"{category}: no pixel metric, the anomalous test images have no mask pixels")
        kept: dict = {}
        per_category[category] = compute_metrics(
            results["score"][rows],
            labels,
            results["map"][rows] if has_pixels else None,
            results["mask"][rows] if has_pixels else None,
            fpr_limit,
            kept,
        )
        if curves is not None and "pro" in kept:
            curves[category] = kept["pro"]
    summary = mean_over_categories(per_category)
    summary["num_test_images"] = int(len(results["label"]))
    if not_computed:
        summary["not_computed"] = not_computed
    return summary


def mean_over_categories(per_category: dict[str, dict]) -> dict:
    """Each metric averaged over the categories that have it, plus the per-category values."""
    summary = {
        key: float(np.mean([m[key] for m in per_category.values() if key in m]))
        for key in METRIC_KEYS
        if any(key in m for m in per_category.values())
    }
    summary["per_category"] = per_category
    return summary


SHORT_NAMES = {
    "image_auroc": "img AUROC",
    "pixel_auroc": "px AUROC",
    "aupro": "AUPRO",
    "image_f1_max": "img F1",
    "pixel_f1_max": "px F1",
}


def print_metrics_table(
    runs: dict[str, dict], console: Console | None = None, title: str = "metrics"
) -> None:
    """One row per (run, category) and a mean row per run, readable at 80 columns (the run names
    head each group; long ones wrap instead of cutting the metric columns)."""
    table = Table(title=title)
    table.add_column("run / category", overflow="fold", min_width=12)
    for key in METRIC_KEYS:
        table.add_column(SHORT_NAMES[key], justify="right", no_wrap=True)
    for name, metrics in runs.items():
        table.add_row(f"[bold]{name}[/bold]", *[""] * len(METRIC_KEYS))
        for category, values in metrics["per_category"].items():
            table.add_row(f"  {category}", *[f"{values[k]:.3f}" if k in values else "-" for k in METRIC_KEYS])
        table.add_row(
            "  [bold]mean[/bold]", *[f"{metrics[k]:.3f}" if k in metrics else "-" for k in METRIC_KEYS]
        )
    console = console or Console()
    console.print(table)
    for name, metrics in runs.items():
        for note in metrics.get("not_computed", []):
            console.print(f"[yellow]{name}: {note}[/yellow]")


def heatmap(values: np.ndarray) -> np.ndarray:
    """A blue-to-red colour map of a [0, 1] array, as uint8 RGB."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    low, mid, high = np.array([0.0, 0.0, 0.6]), np.array([1.0, 1.0, 0.0]), np.array([0.9, 0.0, 0.0])
    rgb = np.where(v < 0.5, low + (mid - low) * (v / 0.5), mid + (high - mid) * ((v - 0.5) / 0.5))
    return (rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None, vmax: float) -> np.ndarray:
    """Image | blended heat map | mask, side by side (image in (3, H, W) float [0, 1])."""
    rgb = (np.transpose(image, (1, 2, 0)) * 255).astype(np.uint8)
    heat = heatmap(anomaly_map / max(vmax, 1e-12))
    blended = (0.5 * rgb + 0.5 * heat).astype(np.uint8)
    truth = (
        np.zeros_like(rgb) if mask is None else np.repeat((mask > 0)[..., None] * 255, 3, 2).astype(np.uint8)
    )
    return np.concatenate([rgb, blended, truth], axis=1)


def write_overlays(
    directory: Path,
    results: dict[str, np.ndarray],
    count: int,
    images_of: Callable[[list[str]], np.ndarray],
) -> list[Path]:
    """PNG overlays of the ``count`` highest- and lowest-scored test images; ``images_of(ids)``
    returns their pixels, float (n, 3, H, W) in [0, 1], in the order asked."""
    if count <= 0 or not results or not len(results["score"]):
        return []
    order = np.argsort(-results["score"], kind="stable")
    picks = [("high", i) for i in order[:count]] + [("low", i) for i in order[::-1][:count]]
    pixels = images_of([str(results["sample_id"][i]) for _, i in picks])
    vmax = float(np.quantile(results["map"], 0.999))
    written = []
    for rank, ((kind, index), image) in enumerate(zip(picks, pixels, strict=True)):
        name = str(results["sample_id"][index]).replace("/", "_").replace("@", "_")
        path = Path(directory) / f"{kind}_{rank % count:02d}_{name}.png"
        picture = overlay(image, results["map"][index], results["mask"][index], vmax)
        write_atomic(path, encode_png(picture))
        written.append(path)
    return written


def save_map_png(path: Path, anomaly_map: np.ndarray, vmax: float) -> None:
    write_atomic(path, encode_png(heatmap(anomaly_map / max(vmax, 1e-12))))
