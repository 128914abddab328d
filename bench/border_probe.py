"""Where RD's false alarms on normal images sit, and what the image border costs (photo benchmark).

Each cell trains one RD student (the shipped defaults, in-process, as ``bench/photo_quality.py``)
and scores its test set with several read-outs of the same maps; one more student is trained on
reflect-padded images for the ``padtrain16`` variant. Image AUROC of each variant, per cell:

- ``plain``: the product's score (mean of the map's top 1 %);
- ``border8`` / ``border16``: the same score on the map without its outer 8 / 16 px. A diagnostic
  only: the benchmark draws its defects' centres in the middle 60 % of the image, so dropping the
  border loses almost no defect here and would miss a user's defects at the edge;
- ``minus_mean`` / ``minus_median`` / ``zscore`` / ``ratio``: the map against the per-pixel mean,
  median or std of the training images' maps; ``oracle_minus_normal_test_mean`` against the mean
  map of the normal TEST images (an upper bound a user cannot have);
- ``reflect16`` / ``reflect32``: test images reflect-padded by 16 / 32 px before scoring, the
  map cropped back (the student trained on unpadded images);
- ``padtrain16``: a student trained AND scored on images reflect-padded by 16 px, map cropped back
  (1.56x the pixels).

``--method patchcore`` reads PatchCore's maps the same way: ``plain`` is its own image score,
``map_max`` the maximum of its blurred map, ``border8`` / ``border16`` the maximum without the border.

Also per cell: ``normal_peak_at_border``, the share of normal test images whose map maximum lies
within 8 px of the edge (a 23 % band of a 128 px image's area).

Run: .venv/bin/python bench/border_probe.py --out bench_out/border_clean.jsonl --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from photo_quality import SETTINGS, store_for  # bench/ is on sys.path when run as a script
from synthetic_quality import load

from cdd_ray.config import load_config
from cdd_ray.data.photos import CATEGORIES
from cdd_ray.evaluate.metrics import auroc
from cdd_ray.models.anomaly_map import image_scores
from cdd_ray.models.detector import score_in_batches
from cdd_ray.models.teacher import TeacherConfig, build_teacher
from cdd_ray.train.fit import fit_detector

SIZE = 128


def reflect(images: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")


def padded_maps(detector: torch.nn.Module, images: torch.Tensor, pad: int) -> torch.Tensor:
    maps, _ = score_in_batches(detector, reflect(images, pad))
    return maps[..., pad:-pad, pad:-pad]


def run_cell(teacher, store: Path, category: str, seed: int, method: str) -> dict:
    overrides = ["method=patchcore"] if method == "patchcore" else ["train.num_domains=1"]
    config = load_config(None, [*overrides, f"train.seed={seed}", "train.epochs=20"])
    train, test = load(store, category, "train", SIZE), load(store, category, "test", SIZE)
    labels = test["labels"]
    detector, _ = fit_detector(config, teacher, train["images"], train["ids"])
    maps, scores = score_in_batches(detector, test["images"])
    if method == "patchcore":  # its own image score (the reweighted nearest-patch distance)
        variants = {"plain": scores, "border8": maps[..., 8:-8, 8:-8], "border16": maps[..., 16:-16, 16:-16]}
        row = {
            name: round(float(auroc((v if v.ndim == 1 else v.flatten(1).max(1).values).numpy(), labels)), 4)
            for name, v in variants.items()
        }
        row["map_max"] = round(float(auroc(maps.flatten(1).max(1).values.numpy(), labels)), 4)
        return row | {"normal_peak_at_border": border_share(maps, labels)}
    train_maps, _ = score_in_batches(detector, train["images"])
    pad_detector, _ = fit_detector(config, teacher, reflect(train["images"], 16), train["ids"])
    mean, std = train_maps.mean(0), train_maps.std(0)
    variants = {
        "plain": maps,
        "border8": maps[..., 8:-8, 8:-8],
        "border16": maps[..., 16:-16, 16:-16],
        "minus_mean": maps - mean,
        "minus_median": maps - train_maps.median(0).values,
        "zscore": (maps - mean) / (std + 1e-6 * std.mean()),
        "ratio": maps / mean,
        "oracle_minus_normal_test_mean": maps - maps[torch.as_tensor(labels == 0)].mean(0),
        "reflect16": padded_maps(detector, test["images"], 16),
        "reflect32": padded_maps(detector, test["images"], 32),
        "padtrain16": padded_maps(pad_detector, test["images"], 16),
    }
    row = {
        name: round(float(auroc(image_scores(m, config.eval.top_fraction).numpy(), labels)), 4)
        for name, m in variants.items()
    }
    return row | {"normal_peak_at_border": border_share(maps, labels)}


def border_share(maps: torch.Tensor, labels) -> float:
    """The share of normal images (label 0) whose map maximum lies within 8 px of the edge."""
    normal = maps[torch.as_tensor(labels == 0)]
    peak = normal.flatten(1).argmax(1)
    ys, xs = peak // SIZE, peak % SIZE
    edge = (ys < 8) | (ys >= SIZE - 8) | (xs < 8) | (xs >= SIZE - 8)
    return round(float(edge.float().mean()), 3)


def report(rows: list[dict]) -> None:
    variants = [k for k in rows[0]["auroc"]]
    # PatchCore's border read-outs are map maxima: pair them with the whole map's maximum
    reference = "map_max" if "map_max" in variants else "plain"
    print(f"{len(rows)} cells; image AUROC mean, paired against {reference} (mean +- std, worst cell)\n")
    print(f"| variant | image AUROC | paired vs {reference} | worst cell |\n|---|---:|---:|---:|")
    for name in variants:
        values = [r["auroc"][name] for r in rows]
        diffs = [r["auroc"][name] - r["auroc"][reference] for r in rows]
        print(
            f"| {name} | {statistics.mean(values):.3f} | {statistics.mean(diffs):+.3f} +- "
            f"{statistics.pstdev(diffs):.3f} | {min(diffs):+.3f} |"
        )
    shares = [r["diagnostics"]["normal_peak_at_border"] for r in rows]
    print(f"\nnormal images peaking within 8 px of the edge: {min(shares):.2f}-{max(shares):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--setting", default="clean", choices=["clean", *SETTINGS])
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--method", default="rd", choices=["rd", "patchcore"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    if args.report:
        report(rows)
        return
    torch.set_num_threads(args.threads)
    teacher = build_teacher(TeacherConfig())
    tree, work = Path("bench_out/photos_tree"), Path("bench_out/photo_stores")
    if not tree.is_dir():
        raise SystemExit(f"{tree} is missing: run bench/photo_quality.py once, which writes it")
    done = {r["key"] for r in rows}
    for seed in args.seeds:
        for category in args.categories:
            key = f"{args.setting}|{args.noise}|{seed}|{category}" + (
                "" if args.method == "rd" else f"|{args.method}"
            )
            if key in done:
                continue
            started = time.perf_counter()
            store = store_for(tree, work, args.setting, args.noise, seed)
            result = run_cell(teacher, store, category, seed, args.method)
            extra = {"normal_peak_at_border": result.pop("normal_peak_at_border")}
            row = {"key": key, "seed": seed, "category": category, "auroc": result, "diagnostics": extra}
            row["seconds"] = round(time.perf_counter() - started, 1)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(row, flush=True)


if __name__ == "__main__":
    main()
