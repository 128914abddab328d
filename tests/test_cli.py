import json

import pandas as pd

from cdd_ray.cli import main
from cdd_ray.config import ConfigError, TrainConfig
from cdd_ray.demo import demo_spec
from cdd_ray.tune.grid import source_key


def test_bad_override_exits_non_zero_with_the_key(capsys):
    assert main(["train", "train.num_domains=-1"]) == 2
    assert "train.num_domains" in capsys.readouterr().out


def test_train_on_a_missing_store_names_it(tmp_path, capsys):
    assert main(["train", f"data.path={tmp_path / 'nothing'}"]) == 2
    assert "not a prepared store" in capsys.readouterr().out


def test_prepare_synthetic_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "store"
    assert (
        main(
            [
                "prepare",
                "synthetic",
                "--out",
                str(out),
                "--category",
                "pill",
                "--image-size",
                "32",
                "--noise-ratio",
                "0.1",
            ]
        )
        == 0
    )
    info = json.loads((out / "store.json").read_text())
    assert info["counts"]["pill/train/anomalous"] == 6 and info["contamination"]["ratio"] == 0.1


def test_demo_quick_runs_a_grid_of_four_methods_with_reports_and_a_summary(ray_session, tmp_path):
    """The demo is a `cdd-ray grid` (photo source, in-process trials): this also covers the grid's
    stores, summaries, error count and ``exclude`` (no clean CDD trial)."""
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "demo.json").read_text())
    for method in ("rd", "cdd", "patchcore", "softpatch"):
        assert set(result[method]) == {"image_auroc_clean", "image_auroc_noisy", "aupro_clean", "aupro_noisy"}
        values = [v for k, v in result[method].items() if not (method == "cdd" and k.endswith("_clean"))]
        assert all(0 <= value <= 1 for value in values)
    assert result["cdd"]["image_auroc_clean"] is None and result["cdd"]["aupro_clean"] is None
    grid = tmp_path / "demo"
    assert json.loads((grid / "grid.json").read_text()) == {"cells": 7, "errors": 0}
    data = grid / "data" / source_key(demo_spec(tmp_path, quick=True))
    assert json.loads((data / "source.json").read_text())["source"]["image_size"] == 64
    stores = sorted(p.name for p in (data / "stores").iterdir())
    assert stores == ["noise0-overlap1-seed0", "noise0.2-overlap1-seed0"]
    summary = pd.read_parquet(grid / "summary.parquet")
    assert len(summary) == 7 and summary["image_auroc_count"].eq(1).all()
    assert summary[summary["method"] == "cdd"]["noise"].tolist() == [0.2]
    table = (grid / "summary.md").read_text()
    assert table.splitlines()[4].startswith("| rd (clean reference) | 0 | True |")
    assert "| softpatch | 0.2 | True |" in table and "| patchcore | 0 | True |" in table
    assert "| cdd | 0 |" not in table and "| cdd | 0.2 | True |" in table
    assert (grid / "summary.html").read_text().count("data:image/png;base64") == 1
    reports = list((grid / "runs").glob("*/report.html"))
    assert len(reports) == 7  # 4 methods x clean and noisy, less CDD's clean trial
    # longest first: the CDD trial starts in the first pair (beside RD's clean one, either may be
    # first by milliseconds), before RD's second; every trained trial before any memory bank's (two
    # trial slots: concurrent_trials on the session's 2 CPUs at one CPU per in-process trial). In the
    # file's order RD's noisy trial and both clean memory banks would start before CDD's.
    started = pd.read_parquet(grid / "trials.parquet").groupby("method")["trial_started"]
    assert started.max()["cdd"] < started.max()["rd"]
    assert max(started.max()[["rd", "cdd"]]) < min(started.min()[["patchcore", "softpatch"]])


def test_demo_epochs_reach_the_grid_and_the_quick_demo_trains_one(tmp_path, monkeypatch):
    import pytest

    import cdd_ray.demo
    from cdd_ray.config import load_config

    def epochs_of(spec) -> int:
        return load_config(None, spec.overrides).train.epochs

    assert epochs_of(demo_spec(tmp_path, quick=False)) == TrainConfig().epochs  # the shipped default
    assert epochs_of(demo_spec(tmp_path, quick=False, epochs=7)) == 7
    assert epochs_of(demo_spec(tmp_path, quick=True, epochs=7)) == 1
    with pytest.raises(ConfigError, match="demo --epochs"):
        demo_spec(tmp_path, quick=False, epochs=0)
    seen = {}
    monkeypatch.setattr(cdd_ray.demo, "run_demo", lambda out, **kwargs: seen.update(kwargs))
    assert main(["demo", "--epochs", "100", "--out", str(tmp_path)]) == 0
    assert seen["epochs"] == 100 and seen["quick"] is False
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert seen["epochs"] is None  # run_demo then trains the shipped default


def test_demo_table_shows_a_cell_left_out_as_a_dash_and_null():
    import io

    from rich.console import Console

    from cdd_ray.demo import DEMO_NOISE, demo_table

    rows = [
        {"method": m, "noise": n, "image_auroc_mean": 0.75 - n, "aupro_mean": 0.625 - n, "category": "lunar"}
        for m in ("rd", "cdd", "patchcore", "softpatch")
        for n in (0.0, DEMO_NOISE)
        if not (m == "cdd" and n == 0.0)
    ]
    rows[-1]["aupro_mean"] = float("nan")  # a metric that failed: null in demo.json too
    out = io.StringIO()
    results = demo_table(pd.DataFrame(rows), Console(file=out, width=200))
    assert results["cdd"] == {
        "image_auroc_clean": None,
        "aupro_clean": None,
        "image_auroc_noisy": 0.55,
        "aupro_noisy": 0.425,
    }
    assert results["rd"]["image_auroc_clean"] == 0.75 and results["softpatch"]["aupro_noisy"] is None
    assert json.loads(json.dumps(results)) == results  # valid JSON: no NaN
    cdd_line = next(line for line in out.getvalue().splitlines() if "cdd" in line)
    cells = [cell.strip() for cell in cdd_line.split("│")]
    assert cells[1:4] == ["cdd", "-", "0.550"] and cells[4] == "-", cdd_line  # method, clean, noisy, drop


def test_grid_dry_run_counts_the_runs_exclude_leaves(tmp_path, capsys):
    import yaml

    grid = {
        "categories": ["lunar", "tissue"],
        "noise_ratios": [0.0, 0.2],
        "seeds": [0],
        "source": {"kind": "photos"},
        "methods": {
            "rd": ["train.num_domains=1"],
            "cdd": ["train.num_domains=2"],
            "pc": ["method=patchcore"],
        },
        "exclude": [{"method": "cdd", "noise": 0.0}, {"method": "pc"}],
        "storage_path": str(tmp_path),
    }
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    assert main(["grid", str(tmp_path / "g.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 12 cells, less CDD's 2 clean ones and PatchCore's 4; PatchCore runs nowhere, so it is not listed
    assert "6 runs (6 left out by exclude), started in this order: cdd, rd" in " ".join(out.split())
