"""``cdd-ray demo``: RD against CDD on the embedded synthetic benchmark with 10% noise, on a local Ray.

Prepares the synthetic store (once), trains plain RD (K=1) and CDD (K=2) on 2 workers for each
category with the offline-pretrained tf_efficientnet_lite0 teacher, evaluates both, prints them side
by side and writes ``demo.json`` ({"rd": metrics, "cdd": metrics}).

``quick=True`` (tests) shrinks the images, the set and the epochs.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from cdd_ray.config import Config, load_config
from cdd_ray.data.prepare import prepare
from cdd_ray.data.store import STORE_FILE, write_json
from cdd_ray.data.synthetic import CATEGORIES, SyntheticConfig
from cdd_ray.evaluate.report import mean_over_categories, print_metrics_table
from cdd_ray.train.run import run_experiment

DEMO_NOISE = 0.1
METHODS = {"rd": ["train.num_domains=1"], "cdd": ["train.num_domains=2"]}


def demo_settings(out: Path, quick: bool) -> tuple[SyntheticConfig, list[str], tuple[str, ...]]:
    base = [f"ray.storage_path={out / 'runs'}", f"data.path={out / 'store'}", "ray.num_workers=2"]
    if quick:
        synthetic = SyntheticConfig(image_size=64, train_normal=16, test_normal=8, test_anomalous=8)
        return synthetic, base + ["data.image_size=64", "train.epochs=1", "train.batch_size=8"], ("weave",)
    return (
        SyntheticConfig(),
        base + ["data.image_size=128", "train.epochs=8", "train.batch_size=16"],
        CATEGORIES,
    )


def run_demo(out: Path, quick: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    out = Path(out).resolve()
    started = time.perf_counter()
    synthetic, overrides, categories = demo_settings(out, quick)
    if not (out / "store" / STORE_FILE).is_file():
        console.print(f"preparing the synthetic benchmark in {out / 'store'} (noise {DEMO_NOISE})")
        prepare(
            "synthetic", None, out / "store", list(categories), noise_ratio=DEMO_NOISE, synthetic=synthetic
        )
    results: dict[str, dict] = {}
    for method, method_overrides in METHODS.items():
        per_category = {}
        for category in categories:
            config: Config = load_config(None, overrides + method_overrides + [f"data.category={category}"])
            outcome = run_experiment(config, console)
            per_category[category] = outcome.metrics["per_category"][category]
        results[method] = mean_over_categories(per_category)
    elapsed = time.perf_counter() - started
    summary = {**results, "seconds": elapsed, "noise_ratio": DEMO_NOISE, "quick": quick}
    write_json(out / "demo.json", summary)
    print_metrics_table(results, console, title=f"RD vs CDD, synthetic benchmark, noise {DEMO_NOISE}")
    console.print(f"demo finished in {elapsed:.0f} s; results in {out / 'demo.json'}")
    return summary
