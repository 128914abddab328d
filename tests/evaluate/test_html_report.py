"""report.html and summary.html: self-contained pages with the figures a user looks at."""

import re

import numpy as np
import pandas as pd

from cdd_ray.evaluate.html_report import GALLERY, write_grid_summary, write_run_report
from cdd_ray.evaluate.report import summarize


def scored_set(count: int = 12, size: int = 16) -> dict:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * (count // 2))
    masks = np.zeros((count, size, size), dtype=np.uint8)
    masks[labels == 1, 4:8, 4:8] = 1
    maps = rng.random((count, size, size)) + 2 * masks
    return {
        "sample_id": np.array([f"weave/test/x/{i:03d}" for i in range(count)], dtype=object),
        "category": np.array(["weave"] * count, dtype=object),
        "defect_type": np.array(["good" if not label else "hole" for label in labels], dtype=object),
        "label": labels,
        "mask": masks,
        "map": maps,
        "score": maps.reshape(count, -1).max(1),
    }


def test_run_report_is_one_self_contained_page_with_curves_histogram_table_and_gallery(tmp_path):
    results = scored_set()
    curves = {}
    metrics = summarize(results, 0.3, curves)
    asked = []

    def images_of(ids):
        asked.extend(ids)
        return np.random.default_rng(1).random((len(ids), 3, 16, 16))

    path = write_run_report(tmp_path / "report.html", results, metrics, "weave-rd", 0.3, images_of, curves)
    page = path.read_text()
    assert page.startswith("<!doctype html>") and "weave-rd" in page
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{100,}">', page)) == 2
    assert "AUPRO" in page and f"{metrics['image_auroc']:.3f}" in page
    assert 'src="http' not in page and "<script" not in page  # nothing fetched from elsewhere
    ranked = np.argsort(-results["score"], kind="stable")
    assert asked[:GALLERY] == [results["sample_id"][i] for i in ranked[:GALLERY]]


def test_the_report_plots_the_pro_curve_summarize_kept_without_computing_it_again(tmp_path, monkeypatch):
    import cdd_ray.evaluate.metrics as metrics_module
    from cdd_ray.evaluate.metrics import aupro, aupro_of_curve, pro_curve

    results = scored_set()
    curves = {}
    metrics = summarize(results, 0.3, curves)
    assert set(curves) == {"weave"}
    fpr, pro = curves["weave"]
    expected = pro_curve(results["map"], results["mask"])
    assert np.array_equal(fpr, expected[0]) and np.array_equal(pro, expected[1])
    assert metrics["aupro"] == aupro(results["map"], results["mask"], 0.3) == aupro_of_curve(fpr, pro, 0.3)

    def computed_again(*args):
        raise AssertionError("the PRO curve was computed a second time")

    monkeypatch.setattr(metrics_module, "pro_curve", computed_again)
    images = np.random.default_rng(1).random((2 * GALLERY, 3, 16, 16))
    write_run_report(tmp_path / "report.html", results, metrics, "weave-rd", 0.3, lambda ids: images, curves)
    assert "AUPRO" in (tmp_path / "report.html").read_text()


def test_grid_summary_plots_each_metric_against_noise_with_the_spread_over_seeds(tmp_path):
    rows = [
        {
            "category": c,
            "noise": n,
            "overlap": False,
            "seed": s,
            "method": m,
            "image_auroc": 0.9 - n + 0.01 * s,
        }
        for c in ("a", "b")
        for n in (0.0, 0.2)
        for s in (0, 1, 2)
        for m in ("rd", "cdd")
    ]
    path = write_grid_summary(tmp_path / "summary.html", pd.DataFrame(rows), "grid g")
    page = path.read_text()
    assert page.count('<img src="data:image/png;base64,') == 1
    assert "0.71" in page and "0.91" in page  # mean over seeds at noise 0.2 and 0
