"""``cdd-ray demo``: RD, CDD, PatchCore and SoftPatch on the photo benchmark's ``lunar`` category,
clean and with 20 % contamination that stays in the test set, as one small grid on a local Ray.

The photo benchmark (``cdd_ray.data.photos``: crops of real photographs with drawn defects) is
written as an MVTec tree and prepared through the MVTec reader; every method runs with its shipped
defaults (but ``DEMO_EPOCHS``) as an in-process Tune trial (two at once on two CPUs, trial
processes reused), and the demo ends with one table: image AUROC and AUPRO per method, clean and
contaminated, and the drop.
RD and CDD train ``DEMO_EPOCHS`` (50) epochs, not the shipped 100, to stay under 5 minutes on 2 cores.
Results: ``demo_out/demo.json`` and the grid folder (``summary.md``, ``summary.html``, every run's
``report.html``).

``quick=True`` (tests) shrinks the images, the set and the epochs.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cdd_ray.config import ConfigError
from cdd_ray.data.store import write_json
from cdd_ray.tune.grid import GridSpec, run_grid

DEMO_NOISE = 0.2
DEMO_CATEGORIES = ("lunar",)  # one category keeps the demo under 5 minutes on 2 cores (BENCHMARKS.md)
# Not the shipped train.epochs (100): at 100 the demo took 442 s on 2 cores, its RD and CDD trials
# alone >= 343 s of two trial slots; at 50, 196 s (README "Demo time"). `cdd-ray demo --epochs 100`.
DEMO_EPOCHS = 50
METHODS = {
    "rd": ["train.num_domains=1"],
    "cdd": ["train.num_domains=2"],
    "patchcore": ["method=patchcore"],
    "softpatch": ["method=softpatch"],
}


def demo_spec(out: Path, quick: bool, epochs: int = DEMO_EPOCHS) -> GridSpec:
    """The demo's grid; ``epochs``: RD's and CDD's ``train.epochs`` (``quick`` trains 1)."""
    if epochs < 1:
        raise ConfigError(f"demo --epochs must be >= 1, got {epochs}")
    overrides = ["ray.num_workers=0", "eval.overlays=2", f"train.epochs={epochs}"]
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
    )


def demo_table(summary, console: Console) -> dict:
    """Per method: mean over categories of image AUROC and AUPRO, clean and contaminated."""
    table = Table(
        title=f"photo benchmark, {DEMO_NOISE:.0%} contamination kept in the test set",
        caption="one seed: differences under ~0.03 are run-to-run spread; 3-seed figures in BENCHMARKS.md",
    )
    for column in ("method", "img AUROC clean", f"noisy {DEMO_NOISE:g}", "drop", "AUPRO clean", "noisy"):
        table.add_column(column, justify="left" if column == "method" else "right")
    results = {}
    for method in METHODS:
        rows = summary[summary["method"] == method]
        clean, noisy = rows[rows["noise"] == 0], rows[rows["noise"] == DEMO_NOISE]
        values = {
            "image_auroc_clean": float(clean["image_auroc_mean"].mean()),
            "image_auroc_noisy": float(noisy["image_auroc_mean"].mean()),
            "aupro_clean": float(clean["aupro_mean"].mean()),
            "aupro_noisy": float(noisy["aupro_mean"].mean()),
        }
        results[method] = values
        drop = values["image_auroc_noisy"] - values["image_auroc_clean"]
        table.add_row(
            method,
            f"{values['image_auroc_clean']:.3f}",
            f"{values['image_auroc_noisy']:.3f}",
            f"{drop:+.3f}",
            f"{values['aupro_clean']:.3f}",
            f"{values['aupro_noisy']:.3f}",
        )
    console.print(table)
    return results


def run_demo(
    out: Path, quick: bool = False, console: Console | None = None, epochs: int | None = None
) -> dict:
    """Run the demo grid under ``out``; ``epochs`` (None: ``DEMO_EPOCHS``) as in ``demo_spec``."""
    epochs = DEMO_EPOCHS if epochs is None else epochs
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
        "epochs": 1 if quick else epochs,
        "grid": str(outcome["grid_dir"]),
    }
    write_json(out / "demo.json", summary)
    console.print(
        f"demo finished in {elapsed:.0f} s; {out / 'demo.json'}; per-run reports under {outcome['grid_dir']}"
    )
    return summary
