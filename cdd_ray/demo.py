"""``cdd-ray demo``: RD, CDD, PatchCore and SoftPatch on the photo benchmark's ``lunar`` category,
clean and with 20 % contamination that stays in the test set, as one small grid on a local Ray.

The photo benchmark (``cdd_ray.data.photos``: crops of real photographs with drawn defects) is
written as an MVTec tree and prepared through the MVTec reader; every method runs with its shipped
defaults (RD and CDD train the shipped ``train.epochs``, 100) as an in-process Tune trial (two at
once on two CPUs, trial processes reused), and the demo ends with one table: image AUROC and AUPRO
per method, clean and contaminated, and the drop.
CDD runs on the contaminated set only (``DEMO_EXCLUDE``): on clean data it matches RD within the
spread (BENCHMARKS.md), and its clean trial would add ~110 s of one trial slot, the demo then over
5 minutes on 2 cores. Results: ``demo_out/demo.json`` and the grid folder (``summary.md``,
``summary.html``, every run's ``report.html``).

``quick=True`` (tests) shrinks the images, the set and the epochs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cdd_ray.config import ConfigError, load_config
from cdd_ray.data.store import write_json
from cdd_ray.tune.grid import GridSpec, run_grid

DEMO_NOISE = 0.2
DEMO_CATEGORIES = ("lunar",)  # one category keeps the demo under 5 minutes on 2 cores (BENCHMARKS.md)
# the clean CDD trial is left out: at 100 epochs the demo took 375 s on 2 cores with it (both slots
# busy to the end), 206 s without it (README "Demo time", 2026-12-02)
DEMO_EXCLUDE = ({"method": "cdd", "noise": 0.0},)
METHODS = {
    "rd": ["train.num_domains=1"],
    "cdd": ["train.num_domains=2"],
    "patchcore": ["method=patchcore"],
    "softpatch": ["method=softpatch"],
}


def demo_spec(out: Path, quick: bool, epochs: int | None = None) -> GridSpec:
    """The demo's grid; ``epochs``: RD's and CDD's ``train.epochs`` (None: the shipped default;
    ``quick`` trains 1).

    Raises:
        ConfigError: ``epochs`` < 1, naming ``demo --epochs``.
    """
    overrides = ["ray.num_workers=0", "eval.overlays=2"]
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"demo --epochs must be >= 1, got {epochs}")
        overrides.append(f"train.epochs={epochs}")
    source = {"kind": "photos"}
    categories = list(DEMO_CATEGORIES)
    if quick:
        source |= {"image_size": 64, "train_normal": 16, "test_normal": 6, "test_anomalous": 8}
        overrides += [
            "data.image_size=64",
            "train.epochs=1",
            "train.batch_size=8",
            "memory_bank.outlier_neighbors=3",
        ]
    return GridSpec(
        name="demo",
        categories=categories,
        noise_ratios=[0.0, DEMO_NOISE],
        seeds=[0],
        methods=METHODS,
        overlap=[True],
        source=source,
        overrides=overrides,
        storage_path=str(out),
        exclude=[dict(entry) for entry in DEMO_EXCLUDE],
    )


def demo_table(summary, console: Console) -> dict:
    """Per method: mean over categories of image AUROC and AUPRO, clean and contaminated."""
    table = Table(
        title=f"photo benchmark, {DEMO_NOISE:.0%} contamination kept in the test set",
        caption="one seed: differences under ~0.03 are run-to-run spread; 3-seed figures in BENCHMARKS.md. "
        "CDD trains on the contaminated set only (on clean data it matches RD within the spread)",
    )
    for column in ("method", "img AUROC clean", f"noisy {DEMO_NOISE:g}", "drop", "AUPRO clean", "noisy"):
        table.add_column(column, justify="left" if column == "method" else "right")
    results = {}
    for method in METHODS:
        rows = summary[summary["method"] == method]
        clean, noisy = rows[rows["noise"] == 0], rows[rows["noise"] == DEMO_NOISE]
        values = {  # None where the demo leaves the cell out (CDD on clean data)
            f"{metric}_{kind}": _mean(part[f"{metric}_mean"])
            for metric in ("image_auroc", "aupro")
            for kind, part in (("clean", clean), ("noisy", noisy))
        }
        results[method] = values
        clean_auroc, noisy_auroc = values["image_auroc_clean"], values["image_auroc_noisy"]
        drop = None if clean_auroc is None or noisy_auroc is None else noisy_auroc - clean_auroc
        table.add_row(
            method,
            _cell(clean_auroc),
            _cell(noisy_auroc),
            _cell(drop, "+.3f"),
            _cell(values["aupro_clean"]),
            _cell(values["aupro_noisy"]),
        )
    console.print(table)
    return results


def _mean(values) -> float | None:
    """The mean, or None (JSON null) where there is none (a cell left out, a metric that failed)."""
    mean = float(values.mean()) if len(values) else math.nan
    return None if math.isnan(mean) else mean


def _cell(value: float | None, form: str = ".3f") -> str:
    return "-" if value is None else format(value, form)


def run_demo(
    out: Path, quick: bool = False, console: Console | None = None, epochs: int | None = None
) -> dict:
    """Run the demo grid under ``out``; ``epochs`` (None: the shipped default) as in ``demo_spec``."""
    console = console or Console()
    out = Path(out).resolve()
    started = time.perf_counter()
    spec = demo_spec(out, quick, epochs)
    outcome = run_grid(spec, console=console, print_table=False)
    results = demo_table(outcome["summary"], console)
    elapsed = time.perf_counter() - started
    summary = {
        **results,
        "seconds": elapsed,
        "noise_ratio": DEMO_NOISE,
        "overlap": True,
        "categories": spec.categories,
        "quick": quick,
        "epochs": load_config(spec.base_config, spec.overrides).train.epochs,
        "grid": str(outcome["grid_dir"]),
    }
    write_json(out / "demo.json", summary)
    console.print(
        f"demo finished in {elapsed:.0f} s; {out / 'demo.json'}; per-run reports under {outcome['grid_dir']}"
    )
    return summary
