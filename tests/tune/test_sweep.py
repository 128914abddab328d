"""Tune sweeps and the benchmark grid on 2 CPUs: concurrency, resume, summaries."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image
from rich.console import Console

from cdd_ray.config import ConfigError, TrainConfig, absolute_paths, load_config
from cdd_ray.tune.grid import (
    GridSpec,
    cell_labels,
    grid_cells,
    grid_record,
    load_grid,
    markdown_table,
    method_costs,
    prepare_stores,
    run_grid,
    source_key,
    summarize_grid,
)
from cdd_ray.tune.spec import load_sweep
from cdd_ray.tune.sweep import EXPERIMENT_FILE, check_resume, run_sweep, sweep_record, write_experiment
from cdd_ray.tune.trial import FAIL_ONCE_ENV, trial_overrides
from tests.conftest import tiny_overrides

# in-process trials (no Train workers to start): the sweep and grid machinery is what is tested here
TINY_TRIAL = {"ray.num_workers": 0, "ray.cpus_per_worker": 1, "data.holdout_fraction": 0.2}
LABEL_FREE = {**TINY_TRIAL, "eval.score_test": "false"}


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def progress_lines(run_dir: str) -> int:
    return len((Path(run_dir) / "progress.jsonl").read_text().splitlines())


def test_sweep_spec_errors_name_the_key(tmp_path):
    bad = write_yaml(tmp_path / "s.yaml", {"search_space": {"train.num_domains": {"grid": []}}})
    with pytest.raises(ConfigError, match=r"search_space.train.num_domains.grid: needs a non-empty list"):
        load_sweep(bad)
    bad = write_yaml(
        tmp_path / "s.yaml", {"search_space": {"a": {"grid": [1]}}, "objective": {"metric": "acc"}}
    )
    with pytest.raises(ConfigError, match="objective.metric"):
        load_sweep(bad)


def test_trial_overrides_flatten_grid_cells():
    params = {"train.num_domains": 3, "cell": {"overrides": ["data.category=pill"], "labels": {}}}
    assert trial_overrides(params) == ["train.num_domains=3", "data.category=pill"]


def test_shipped_sweep_and_grid_files_parse():
    root = Path(__file__).parent.parent.parent / "sweeps"
    sweep = load_sweep(root / "domains_and_weights.yaml")
    assert not sweep.uses_labels and "train.num_domains" in sweep.search_space
    grid = load_grid(root / "fuad_grid.yaml")
    assert set(grid.methods) == {"rd", "cdd", "patchcore", "softpatch"} and 0.0 in grid.noise_ratios
    photos = load_grid(root / "photo_grid.yaml")
    assert photos.source == {"kind": "photos"} and set(photos.overlap) == {False, True}
    # its base (cdd_synthetic.yaml) trains 8 epochs: the photo grid must pin the shipped default
    assert f"train.epochs={TrainConfig().epochs}" in photos.overrides


def test_sweep_runs_two_trials_at_once_and_resume_finishes_only_the_missing_one(
    ray_session, tiny_store, tmp_path, monkeypatch
):
    overrides = tiny_overrides(tiny_store, tmp_path / "unused", **LABEL_FREE)
    spec_path = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "name": "tiny",
            "overrides": overrides,
            "search_space": {"train.num_domains": {"grid": [1, 2, 3]}},
            "objective": {"metric": "proxy_loss", "mode": "min"},
            "storage_path": str(tmp_path / "sweeps"),
        },
    )
    monkeypatch.setenv(FAIL_ONCE_ENV, str(tmp_path / "failed-once"))
    first = run_sweep(load_sweep(spec_path))
    assert first["errors"] == 1, "the test fault should interrupt exactly one trial"
    done = first["trials"].dropna(subset=["proxy_loss"])
    assert len(done) == 2
    # Two trials ran concurrently (in-process trials of 1 CPU each on 2 CPUs): the failing one saw
    # another start while it was running (it waits for one, at most 120 s)
    assert (tmp_path / "failed-once").read_text() == "concurrent", "the trials ran one at a time"
    before = {row.run_dir: progress_lines(row.run_dir) for row in done.itertuples()}

    resumed = run_sweep(load_sweep(spec_path), resume=True)
    assert resumed["errors"] == 0
    trials = resumed["trials"]
    assert len(trials) == 3 and trials["proxy_loss"].notna().all()
    assert sorted(trials["config/train.num_domains"]) == [1, 2, 3]
    for run_dir, lines in before.items():
        assert progress_lines(run_dir) == lines, f"finished trial {run_dir} was run again"
    sweep_dir = tmp_path / "sweeps" / "tiny"
    assert len(pd.read_parquet(sweep_dir / "trials.parquet")) == 3
    assert len(pd.read_csv(sweep_dir / "trials.csv")) == 3
    assert resumed["best"]["proxy_loss"] == trials["proxy_loss"].min()


def test_grid_data_are_keyed_by_source_so_an_edited_grid_file_never_reuses_old_stores(tmp_path):
    tiny = {"kind": "photos", "train_normal": 4, "test_normal": 2, "test_anomalous": 2}
    spec = GridSpec(name="g", categories=["lunar"], noise_ratios=[0.0], seeds=[0], methods={"rd": []})
    small = GridSpec(**{**spec.__dict__, "source": {**tiny, "image_size": 32}})
    large = GridSpec(**{**spec.__dict__, "source": {**tiny, "image_size": 48}})
    edge = GridSpec(**{**spec.__dict__, "source": {**tiny, "image_size": 32, "defects_at": "edge"}})
    keys = {source_key(s) for s in (small, large, edge)}
    assert len(keys) == 3
    assert source_key(GridSpec(**{**small.__dict__, "categories": ["lunar", "retina"]})) not in keys
    other_cells = GridSpec(**{**small.__dict__, "seeds": [5], "noise_ratios": [0.4]})
    assert source_key(other_cells) == source_key(small)
    console = Console(record=True, width=200)
    for grid in (small, large):
        (store,) = prepare_stores(grid, tmp_path, console).values()
        data = tmp_path / "data" / source_key(grid)
        assert store.parent.parent == data
        record = json.loads((data / "source.json").read_text())
        assert record == {"source": grid.source, "categories": ["lunar"]}
        image = next((data / "photos_tree" / "lunar" / "train" / "good").glob("*.png"))
        assert Image.open(image).size == (grid.source["image_size"],) * 2
    console.export_text()
    prepare_stores(small, tmp_path, console)  # the same grid again: tree and store reused, nothing written
    assert console.export_text() == ""
    # --resume keeps the data paths the trials started with: a grid file edited to another source is refused
    # before Ray starts (nothing is prepared for it)
    edge_at = GridSpec(**{**edge.__dict__, "storage_path": str(tmp_path.parent), "name": tmp_path.name})
    with pytest.raises(ConfigError, match=rf"data/{source_key(edge)} is missing.*--resume"):
        run_grid(edge_at, resume=True, console=console)
    assert not (tmp_path / "data" / source_key(edge)).exists()


def test_grid_cells_put_the_costliest_methods_first_and_bad_method_overrides_are_named():
    methods = {
        "patchcore": ["method=patchcore"],
        "rd": ["train.num_domains=1"],
        "cdd": ["train.num_domains=2"],
        "rd_long": ["train.num_domains=1", "train.epochs=40"],
        "softpatch": ["method=softpatch"],
    }
    spec = GridSpec(name="g", categories=["a", "b"], noise_ratios=[0.0, 0.2], seeds=[0], methods=methods)
    base = load_config(None, ["train.epochs=10"])
    costs = method_costs(spec, base)
    assert costs == {"patchcore": 0, "rd": 10, "cdd": 20, "rd_long": 40, "softpatch": 0}
    stores = {(noise, False, 0): Path(f"/s{noise}") for noise in spec.noise_ratios}
    ordered = grid_cells(spec, stores, costs)
    as_listed = grid_cells(spec, stores)
    assert sorted(map(str, ordered)) == sorted(map(str, as_listed))  # the same 20 trials
    methods_in_order = [cell["labels"]["method"] for cell in ordered]
    assert methods_in_order == ["rd_long"] * 4 + ["cdd"] * 4 + ["rd"] * 4 + ["patchcore", "softpatch"] * 4
    # ties keep the grid file's order (category, noise, ...)
    assert [(c["labels"]["category"], c["labels"]["noise"]) for c in ordered[:4]] == [
        ("a", 0.0),
        ("a", 0.2),
        ("b", 0.0),
        ("b", 0.2),
    ]
    typo = GridSpec(**{**spec.__dict__, "methods": {**methods, "cdd": ["train.num_domain=2"]}})
    with pytest.raises(ConfigError, match=r"grid method 'cdd': unknown config key 'train.num_domain'"):
        method_costs(typo, base)


def test_grid_exclude_leaves_out_matching_cells_and_names_a_bad_entry(tmp_path):
    base = {
        "categories": ["a", "b"],
        "noise_ratios": [0.0, 0.2],
        "seeds": [0, 1],
        "methods": {"rd": ["train.num_domains=1"], "cdd": ["train.num_domains=2"]},
    }
    spec = load_grid(write_yaml(tmp_path / "g.yaml", {**base, "exclude": [{"method": "cdd", "noise": 0}]}))
    stores = {(noise, False, seed): Path(f"/s{noise}-{seed}") for noise in (0.0, 0.2) for seed in (0, 1)}
    labels = [cell["labels"] for cell in grid_cells(spec, stores)]
    assert len(labels) == 12  # 16 cells less CDD's 4 clean ones; 0 in the file matches the grid's 0.0
    assert {(c["method"], c["noise"]) for c in labels} == {("rd", 0.0), ("rd", 0.2), ("cdd", 0.2)}
    two_keys = GridSpec(**{**spec.__dict__, "exclude": [{"method": "rd", "seed": 1}, {"category": "b"}]})
    assert {(c["category"], c["method"], c["seed"]) for c in cell_labels(two_keys)} == {
        ("a", "rd", 0),
        ("a", "cdd", 0),
        ("a", "cdd", 1),
    }
    # the record holds exclude only when there is one: a grid started before exclude existed resumes
    config = load_config(None, [])
    assert grid_record(spec, config)["exclude"] == [{"method": "cdd", "noise": 0}]
    assert "exclude" not in grid_record(GridSpec(**{**spec.__dict__, "exclude": []}), config)
    bad = {
        "methd": r"exclude\[0\]: unknown key 'methd'",
        "noise": r"exclude\[0\]: noise 0.1 is not among the grid's \[0.0, 0.2\]",
        "method": r"exclude\[0\]: method 'cd' is not among",
    }
    values = {"methd": "cdd", "noise": 0.1, "method": "cd"}
    for key, message in bad.items():
        path = write_yaml(tmp_path / f"bad_{key}.yaml", {**base, "exclude": [{key: values[key]}]})
        with pytest.raises(ConfigError, match=rf"bad_{key}.yaml: {message}"):
            load_grid(path)
    with pytest.raises(ConfigError, match=r"exclude\[1\] must be a non-empty mapping"):
        load_grid(write_yaml(tmp_path / "empty.yaml", {**base, "exclude": [{"seed": 0}, {}]}))
    with pytest.raises(ConfigError, match="exclude leaves no cell to run"):
        load_grid(write_yaml(tmp_path / "all.yaml", {**base, "exclude": [{"seed": 0}, {"seed": 1}]}))
    # a YAML boolean is not a number: `seed: true` is not seed 1, `overlap: 0` not `false`
    with pytest.raises(ConfigError, match=r"exclude\[0\]: seed True is not among the grid's \[0, 1\]"):
        load_grid(write_yaml(tmp_path / "bool.yaml", {**base, "exclude": [{"seed": True}]}))
    with pytest.raises(ConfigError, match=r"exclude\[0\]: overlap 0 is not among the grid's \[False\]"):
        load_grid(write_yaml(tmp_path / "zero.yaml", {**base, "exclude": [{"overlap": 0}]}))
    with pytest.raises(ConfigError, match="exclude must be a list of mappings"):
        load_grid(write_yaml(tmp_path / "map.yaml", {**base, "exclude": {"method": "cdd"}}))
    # the summary table marks a mean over fewer categories than the other rows'
    no_cdd_b = GridSpec(**{**spec.__dict__, "exclude": [{"method": "cdd", "category": "b"}]})
    frame = pd.DataFrame(
        [{**cell, "image_auroc": 0.5 + 0.1 * cell["seed"]} for cell in cell_labels(no_cdd_b)]
    )
    lines = markdown_table(summarize_grid(frame)).splitlines()
    assert [line for line in lines if line.startswith("| cdd | 0 |")] == [
        "| cdd | 0 | False | 0.550 ± 0.071 | - | 0.550* |"
    ]
    assert [line for line in lines if line.startswith("| rd | 0.2 |")] == [
        "| rd | 0.2 | False | 0.550 ± 0.071 | 0.550 ± 0.071 | 0.550 |"
    ]
    assert lines[-1].startswith("\\* the mean over the categories the row has")


def started_experiment(directory: Path, record: dict | None) -> Path:
    """A folder as a started sweep or grid leaves it: Tune's state (``tuner.pkl``, what
    ``Tuner.can_restore`` looks for) and, unless None, cdd-ray's record."""
    (directory / "trials").mkdir(parents=True)
    (directory / "trials" / "tuner.pkl").write_bytes(b"")
    if record is not None:
        write_experiment(directory, record)
    return directory


def no_ray(monkeypatch, module) -> None:
    """Make starting Ray from ``module`` fail the test: the checks must come before it."""

    def refuse():
        raise AssertionError("Ray started before the resume check")

    monkeypatch.setattr(module, "ensure_ray", refuse)


def test_resume_refuses_settings_other_than_those_the_experiment_started_with(tmp_path):
    console = Console(record=True, width=200)
    record = {"base": {"train": {"epochs": 10, "seed": 0}}, "seeds": [0, 1]}
    with pytest.raises(FileNotFoundError, match=r"new/trials: no Tune experiment to resume"):
        check_resume(tmp_path / "new", record, console)
    exp = started_experiment(tmp_path / "exp", record)
    check_resume(exp, json.loads(json.dumps(record)), console)  # the same settings: resumed
    changed = {"base": {"train": {"epochs": 20, "seed": 0}}, "seeds": [0, 1]}
    with pytest.raises(
        ConfigError,
        match=r"exp/experiment.json: --resume with other settings .*\(base.train.epochs: 10 -> 20\)",
    ):
        check_resume(exp, changed, console)
    assert json.loads((exp / EXPERIMENT_FILE).read_text()) == record  # kept as it started
    console.export_text()
    check_resume(started_experiment(tmp_path / "old", None), record, console)  # started before the record
    assert "not checked" in console.export_text()


def test_sweep_resume_with_another_search_space_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import cdd_ray.tune.sweep

    spec = load_sweep(
        write_yaml(
            tmp_path / "s.yaml",
            {
                "name": "s",
                "overrides": ["train.epochs=3"],
                "search_space": {"train.num_domains": {"grid": [1, 2]}},
                "storage_path": str(tmp_path / "out"),
            },
        )
    )
    base = absolute_paths(load_config(None, spec.overrides))
    started_experiment(tmp_path / "out" / "s", sweep_record(spec, base))
    no_ray(monkeypatch, cdd_ray.tune.sweep)
    spec.search_space = {"train.num_domains": {"grid": [1, 3]}}
    with pytest.raises(ConfigError, match=r"search_space.train.num_domains.grid: \[1, 2\] -> \[1, 3\]"):
        run_sweep(spec, resume=True, console=Console(quiet=True))


def test_grid_resume_with_changed_overrides_or_methods_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import cdd_ray.tune.grid

    tiny = {"kind": "photos", "train_normal": 4, "test_normal": 2, "test_anomalous": 2, "image_size": 32}
    spec = GridSpec(
        name="g",
        categories=["lunar"],
        noise_ratios=[0.0],
        seeds=[0],
        methods={"rd": ["train.num_domains=1"]},
        source=tiny,
        overrides=["train.epochs=3", "ray.storage_path=runs", "data.path=somewhere"],
        storage_path=str(tmp_path),
    )
    grid_dir = tmp_path / "g"
    prepare_stores(spec, grid_dir, Console(quiet=True))  # as a started grid has them
    started_experiment(grid_dir, grid_record(spec, absolute_paths(load_config(None, spec.overrides))))
    no_ray(monkeypatch, cdd_ray.tune.grid)
    # keys each trial sets itself (relative paths resolved in another folder) are not compared
    monkeypatch.chdir(tmp_path)
    again = grid_record(spec, absolute_paths(load_config(None, spec.overrides)))
    check_resume(grid_dir, again, Console(quiet=True))
    for changed, key in [
        (GridSpec(**{**spec.__dict__, "overrides": ["train.epochs=4"]}), r"base\.train\.epochs: 3 -> 4"),
        (
            GridSpec(**{**spec.__dict__, "methods": {"rd": ["train.num_domains=1", "train.seed=1"]}}),
            r"methods\.rd: \['train.num_domains=1'\] -> \['train.num_domains=1', 'train.seed=1'\]",
        ),
    ]:
        # the only difference named: nothing else in the record moves between two loads of one grid
        with pytest.raises(
            ConfigError, match=rf"--resume with other settings than the experiment started with \({key}\)"
        ):
            run_grid(changed, resume=True, console=Console(quiet=True))


def test_markdown_table_puts_the_clean_reference_first():
    frame = pd.DataFrame(
        [
            {"category": c, "noise": n, "overlap": False, "seed": s, "method": m, "image_auroc": v}
            for c in ("a", "b")
            for n, m, v in ((0.1, "cdd", 0.9), (0.0, "rd", 0.95), (0.1, "rd", 0.8))
            for s in (0, 1)
        ]
    )
    table = markdown_table(summarize_grid(frame))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows[0].startswith("| rd (clean reference) | 0 |")
    assert "0.950 ± 0.000" in rows[0]


def test_asha_on_a_sequential_run_sees_only_the_aggregation_epochs(ray_session, tiny_store, tmp_path):
    """With ``sequential`` the DST epochs come first and report no global-student metric; ASHA must
    not be handed those reports (Tune refuses a result without the scheduler's metric)."""
    run = {**LABEL_FREE, "train.schedule": "sequential", "train.epochs": 2}
    spec_path = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "name": "seq-asha",
            "overrides": tiny_overrides(tiny_store, tmp_path / "unused", **run),
            "search_space": {"train.num_domains": {"grid": [2]}},
            "objective": {"metric": "proxy_loss", "mode": "min"},
            "scheduler": "asha",
            "storage_path": str(tmp_path / "sweeps"),
        },
    )
    outcome = run_sweep(load_sweep(spec_path))
    assert outcome["errors"] == 0
    trial = outcome["trials"].iloc[0]
    # the final report (after evaluation) arrived: ASHA did not stop the trial at its last epoch
    assert trial["proxy_loss"] > 0 and pd.notna(trial["trial_finished"])
    reports = [
        json.loads(line) for line in (Path(trial["run_dir"]) / "progress.jsonl").read_text().splitlines()
    ]
    assert [r["stage"] for r in reports] == ["dst", "dst", "global", "global"]
