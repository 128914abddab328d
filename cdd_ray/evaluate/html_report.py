"""Self-contained HTML reports: ``report.html`` per run, ``summary.html`` per grid (matplotlib figures
embedded as PNG data URIs, so the file can be mailed or opened anywhere, offline).

A run's report holds, per category: the image-level ROC and precision-recall curves, the
per-region-overlap (PRO) curve up to the FPR limit with its normalized area (AUPRO), histograms of
the normal and anomalous test images' scores with the F1-max decision threshold, the metrics table,
and a gallery of the highest- and lowest-scored test images with the predicted region (anomaly map
>= the pixel F1-max threshold) outlined in red next to the ground truth in green.

A grid's summary plots each metric against the noise ratio, one line per method (and overlap
setting), with the mean over categories and the standard deviation over seeds as error bars.

Example::

    curves = {}
    metrics = summarize(results, fpr_limit=0.3, curves=curves)
    write_run_report(run_dir / "report.html", results, metrics, "weave-cdd", 0.3, images_of, curves)
    write_grid_summary(grid_dir / "summary.html", trials_frame)
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cdd_ray.data.store import write_atomic
from cdd_ray.evaluate.metrics import Ranking, precision_recall_points, roc_points
from cdd_ray.evaluate.report import METRIC_KEYS, SHORT_NAMES

GALLERY = 4  # images at each end of the score ranking
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
.note { color: #a60; }
"""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and servers
    import matplotlib.pyplot as plt

    return plt


def _embed(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(figure)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _curves(
    rows: dict[str, np.ndarray], metrics: dict, fpr_limit: float, pro: tuple[np.ndarray, np.ndarray] | None
) -> str:
    """The four figures of one category; ``pro``: its PRO curve (None when it has no AUPRO)."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    labels, scores = rows["label"], rows["score"]
    ranking = Ranking(scores, "image scores")
    fpr, tpr = roc_points(ranking, labels)
    axes[0].plot(fpr, tpr)
    axes[0].plot([0, 1], [0, 1], ":", color="gray")
    axes[0].set(title=f"ROC (image AUROC {metrics['image_auroc']:.3f})", xlabel="FPR", ylabel="TPR")
    precision, recall = precision_recall_points(ranking, labels)
    axes[1].plot(recall, precision)
    axes[1].set(
        title=f"precision-recall (F1-max {metrics['image_f1_max']:.3f})", xlabel="recall", ylabel="precision"
    )
    if "aupro" in metrics:
        pro_fpr, pro_values = pro
        inside = pro_fpr <= fpr_limit
        axes[2].plot(pro_fpr[inside], pro_values[inside])
        axes[2].set(
            title=f"PRO to FPR {fpr_limit:g} (AUPRO {metrics['aupro']:.3f})", xlabel="FPR", ylabel="PRO"
        )
    else:
        axes[2].set_axis_off()
        axes[2].text(0.5, 0.5, "no masks: no PRO curve", ha="center")
    bins = np.linspace(scores.min(), scores.max(), 30)
    axes[3].hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal")
    axes[3].hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomalous")
    axes[3].axvline(metrics["image_threshold"], color="k", linestyle="--", label="F1-max threshold")
    axes[3].set(title="image scores", xlabel="score", ylabel="images")
    axes[3].legend()
    return _embed(figure)


def _gallery(rows: dict[str, np.ndarray], metrics: dict, images: np.ndarray, order: np.ndarray) -> str:
    plt = _pyplot()
    figure, axes = plt.subplots(2, len(order), figsize=(2.4 * len(order), 5.2), squeeze=False)
    threshold = metrics.get("pixel_threshold")
    for column, (index, image) in enumerate(zip(order, images, strict=True)):
        top, bottom = axes[0][column], axes[1][column]
        top.imshow(np.transpose(image, (1, 2, 0)))
        if threshold is not None:
            top.contour(rows["map"][index] >= threshold, levels=[0.5], colors="red", linewidths=1)
        top.set_title(f"{rows['defect_type'][index]}\nscore {rows['score'][index]:.3g}", fontsize=8)
        bottom.imshow(np.transpose(image, (1, 2, 0)))
        if rows["mask"][index].any():
            bottom.contour(rows["mask"][index] > 0, levels=[0.5], colors="lime", linewidths=1)
        bottom.set_title("ground truth", fontsize=8)
        for axis in (top, bottom):
            axis.set_axis_off()
    return _embed(figure)


def _metrics_table(metrics: dict) -> str:
    head = "".join(f"<th>{SHORT_NAMES[k]}</th>" for k in METRIC_KEYS)
    lines = [f"<table><tr><th>category</th>{head}</tr>"]
    for name, values in [*metrics["per_category"].items(), ("mean", metrics)]:
        cells = "".join(f"<td>{values[k]:.3f}</td>" if k in values else "<td>-</td>" for k in METRIC_KEYS)
        lines.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return "\n".join(lines) + "</table>"


def write_run_report(
    path: Path,
    results: dict[str, np.ndarray],
    metrics: dict,
    title: str,
    fpr_limit: float,
    images_of: Callable[[list[str]], np.ndarray],
    pro_curves: dict,
) -> Path:
    """report.html for one scored test set (``results`` as ``summarize`` takes them);
    ``pro_curves``: the PRO curves ``summarize`` kept (category -> (fpr, pro))."""
    parts = [f"<h1>{html.escape(title)}</h1>", _metrics_table(metrics)]
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in metrics.get("not_computed", [])]
    for category, values in metrics["per_category"].items():
        if "image_auroc" not in values:
            continue
        rows = {key: value[results["category"] == category] for key, value in results.items()}
        ranked = np.argsort(-rows["score"], kind="stable")
        order = np.concatenate([ranked[:GALLERY], ranked[::-1][:GALLERY][::-1]])
        images = images_of([str(rows["sample_id"][i]) for i in order])
        parts += [
            f"<h2>{html.escape(category)}</h2>",
            _curves(rows, values, fpr_limit, pro_curves.get(category)),
            f"<h3>the {GALLERY} highest and {GALLERY} lowest scores: predicted region red, truth green</h3>",
            _gallery(rows, values, images, order),
        ]
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    page += f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    write_atomic(path, page)
    return path


def write_grid_summary(path: Path, frame, title: str) -> Path:
    """summary.html: each metric against the noise ratio per method (and overlap), mean over
    categories per seed, then mean and standard deviation over seeds (error bars)."""
    plt = _pyplot()
    metrics = [m for m in METRIC_KEYS if m in frame]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    per_seed = frame.groupby(["method", "overlap", "noise", "seed"], sort=True)[metrics].mean().reset_index()
    for (method, overlap), part in per_seed.groupby(["method", "overlap"], sort=True):
        stats = part.groupby("noise")[metrics].agg(["mean", "std"])
        label = f"{method}{' (overlap)' if overlap else ''}"
        for axis, metric in zip(axes[0], metrics, strict=True):
            axis.errorbar(
                stats.index,
                stats[(metric, "mean")],
                yerr=stats[(metric, "std")].fillna(0),
                capsize=3,
                marker="o",
                label=label,
            )
    for axis, metric in zip(axes[0], metrics, strict=True):
        axis.set(title=SHORT_NAMES[metric], xlabel="noise ratio")
    axes[0][0].legend(fontsize=8)
    table = frame.groupby(["method", "overlap", "noise"])[metrics].agg(["mean", "std"]).round(3)
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
    page += f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    page += "<p>mean over categories and seeds; error bars: standard deviation over seeds</p>"
    page += _embed(figure) + table.to_html() + "</body></html>\n"
    write_atomic(path, page)
    return path
