"""How well does the label-free proxy rank configurations? A real sweep on the synthetic benchmark,
then the Spearman rank correlation between the proxy (lower is better) and the labeled image AUROC.

Runs `cdd-ray sweep` on bench/proxy_rank_sweep.yaml (it prepares the noisy store first).
Run: .venv/bin/python bench/proxy_rank.py [--out bench_out]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scipy.stats import spearmanr

from cdd_ray.data.prepare import prepare
from cdd_ray.data.store import STORE_FILE
from cdd_ray.tune.spec import load_sweep
from cdd_ray.tune.sweep import run_sweep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--category", default="weave")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    store = out / "synthetic-noise0.1"
    if not (store / STORE_FILE).is_file():
        prepare("synthetic", None, store, noise_ratio=0.1)
    spec = load_sweep(
        Path(__file__).with_name("proxy_rank_sweep.yaml"),
        [f"data.path={store}", f"data.category={args.category}"],
    )
    spec.storage_path = str(out / "sweeps")
    trials = run_sweep(spec)["trials"].dropna(subset=["proxy_loss", "image_auroc"])
    rho, p_value = spearmanr(-trials["proxy_loss"], trials["image_auroc"])
    columns = ["config/train.num_domains", "config/objective.lambda_teacher", "config/objective.gating"]
    print(trials[[*columns, "proxy_loss", "image_auroc", "pixel_auroc", "aupro"]].to_string(index=False))
    print(
        f"\nSpearman rho(-proxy_loss, image_auroc) over {len(trials)} trials: {rho:.3f} (p = {p_value:.3f})"
    )
    rho_pixel, _ = spearmanr(-trials["proxy_loss"], trials["aupro"])
    print(f"Spearman rho(-proxy_loss, aupro): {rho_pixel:.3f}")


if __name__ == "__main__":
    main()
