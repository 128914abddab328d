"""How RD/CDD turn feature distances into scores: variants scored from the SAME trained students.

Each cell (category, seed) trains one detector on the photo benchmark (``bench/photo_quality.py``'s
stores and ``fit_detector``, the shipped defaults but ``train.epochs`` pinned at 20, the default of
its day) and scores the test set with several anomaly-map variants, side by side, so differences
come from the scoring alone:

- ``levels``: which teacher levels enter the map (RD4AD sums all three; PatchCore's features use
  levels 2 and 3 only);
- ``score``: the image score, the map's maximum (RD4AD) or the mean of its top fraction of pixels
  (``--tops``, default 1 %; ``cdd_ray.models.anomaly_map.image_scores``, the product's);
- ``sigma``: the Gaussian blur of the map (4, RD4AD's);
- ``pool``: local aggregation of teacher and student features before the cosine distance (a k x k
  mean, stride 1, as PatchCore aggregates a patch's neighbourhood; 1 = none, RD4AD's). Variants
  with pool > 1 are named ``...-p{k}``.
- ``distance`` (``--distances``): ``cos`` (1 - cosine, RD4AD's; blind to a change of a feature's
  length), ``l2`` (the Euclidean distance, which sees it; PatchCore's metric), or ``cosl2`` (both
  added). Every level's l2 and cos maps are divided by their mean over the training images, so the
  levels and the two distances weigh alike (training statistics only). Variants other than ``cos``
  are named ``...-d{distance}``.

Run: .venv/bin/python bench/rd_scoring.py --out bench_out/rd_scoring.jsonl --seeds 0 1 2
     .venv/bin/python bench/rd_scoring.py --out bench_out/rd_scoring.jsonl --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_quality import METHODS, store_for  # noqa: E402
from synthetic_quality import load  # noqa: E402

from cdd_ray.config import load_config  # noqa: E402
from cdd_ray.data.photos import CATEGORIES, PhotoBenchmarkConfig, write_photo_benchmark  # noqa: E402
from cdd_ray.evaluate.metrics import compute_metrics  # noqa: E402
from cdd_ray.models.anomaly_map import gaussian_blur, image_scores  # noqa: E402
from cdd_ray.models.teacher import TeacherConfig, build_teacher  # noqa: E402
from cdd_ray.train.fit import fit_detector  # noqa: E402

LEVELS = {"123": (0, 1, 2), "23": (1, 2), "12": (0, 1), "3": (2,)}
SIGMAS = (4.0, 2.0)


def pooled(features: torch.Tensor, pool: int) -> torch.Tensor:
    """The mean over each ``pool`` x ``pool`` neighbourhood (stride 1, same size); pool 1: unchanged."""
    if pool == 1:
        return features
    return F.avg_pool2d(features, pool, stride=1, padding=pool // 2, count_include_pad=False)


def level_distance(t: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, 1, h, w): 1 - cosine (``cos``) or the Euclidean distance (``l2``) over channels."""
    if kind == "cos":
        return 1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)
    return (t - s).norm(dim=1, keepdim=True)


def distances(
    detector, images: torch.Tensor, pools: list[int], kinds: tuple[str, ...] = ("cos",)
) -> dict[tuple[int, str], list[torch.Tensor]]:
    """Per (pooling size, distance kind), per level maps upsampled to the image, (N, H, W) each;
    features averaged over ``pool`` x ``pool`` neighbourhoods first when pool > 1. One forward pass
    of teacher and student serves every variant."""
    out = {(pool, kind): [[], [], []] for pool in pools for kind in kinds}
    with torch.no_grad():
        detector.student.eval()
        for start in range(0, len(images), 16):
            batch = images[start : start + 16].float()
            teacher = detector.teacher(batch)
            student = detector.student(teacher)
            for level, (t, s) in enumerate(zip(teacher, student, strict=True)):
                for pool, kind in out:
                    d = level_distance(pooled(t, pool), pooled(s, pool), kind)
                    d = F.interpolate(d, size=batch.shape[-2:], mode="bilinear").squeeze(1)
                    out[(pool, kind)][level].append(d)
    return {key: [torch.cat(level) for level in levels] for key, levels in out.items()}


def distance_maps(detector, train, test, pools: list[int], kinds: list[str]) -> dict:
    """Per (pool, distance): per level test maps; ``l2`` and ``cosl2`` maps divided per level by the
    level's mean over the training images (``cos`` as RD4AD, unscaled)."""
    raw = set(kinds) - {"cosl2"} | ({"cos", "l2"} if "cosl2" in kinds else set())
    test_maps = distances(detector, test, pools, tuple(sorted(raw)))
    train_maps = distances(detector, train, pools, tuple(sorted(raw)))

    def scaled(pool: int, kind: str) -> list[torch.Tensor]:
        means = [level.mean() for level in train_maps[(pool, kind)]]
        return [level / mean for level, mean in zip(test_maps[(pool, kind)], means, strict=True)]

    out = {}
    for pool in pools:
        for kind in kinds:
            if kind == "cos":
                out[(pool, kind)] = test_maps[(pool, "cos")]
            elif kind == "l2":
                out[(pool, kind)] = scaled(pool, "l2")
            else:
                pairs = zip(scaled(pool, "cos"), scaled(pool, "l2"), strict=True)
                out[(pool, kind)] = [a + b for a, b in pairs]
    return out


def score_kinds(tops: list[float]) -> dict[str, float]:
    """Image-score variant name -> top fraction (0: the map's maximum): ``max``, ``top1pct``, ..."""
    return {"max": 0.0} | {f"top{100 * fraction:g}pct": fraction for fraction in tops}


def pools_suffix(pools: list[int], kinds: list[str] | None = None) -> str:
    """Key suffix of a run that scored pooled variants or other distances too (none for the
    default: no pooling, cosine only)."""
    suffix = "" if pools == [1] else "|pools" + "-".join(map(str, pools))
    return suffix + ("" if not kinds or kinds == ["cos"] else "|d" + "-".join(kinds))


def tops_suffix(tops: list[float]) -> str:
    """Key suffix of a run that scored other top fractions than 1 % (none for the default)."""
    return "" if tops == [0.01] else "|tops" + "-".join(f"{t:g}" for t in tops)


def run(args) -> None:
    if 1 not in args.pools or any(k < 1 or k % 2 == 0 for k in args.pools):
        raise SystemExit(f"--pools {args.pools}: odd sizes >= 1, including 1 (the default scoring)")
    if "cos" not in args.distances or "123" not in args.levels or 4.0 not in args.sigmas:
        raise SystemExit("--distances, --levels, --sigmas must include the default (cos, 123, 4)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = {json.loads(line)["key"] for line in out.read_text().splitlines()} if out.is_file() else set()
    tree = Path(args.tree)
    if not tree.exists():
        write_photo_benchmark(tree, PhotoBenchmarkConfig(categories=tuple(CATEGORIES)))
    teacher_config = TeacherConfig()
    teacher = build_teacher(teacher_config)
    for seed, category, method in product(args.seeds, args.categories, args.methods):
        key = f"{args.setting}|{args.noise}|{seed}|{category}|{method}" + pools_suffix(
            args.pools, args.distances
        )
        key += tops_suffix(args.tops)
        if key in done:
            continue
        store = store_for(tree, Path(args.work), args.setting, args.noise, seed)
        config = load_config(None, [*METHODS[method], "train.epochs=20", f"train.seed={seed}"])
        train = load(store, category, "train", 128)
        test = load(store, category, "test", 128)
        started = time.perf_counter()
        detector, _ = fit_detector(config, teacher, train["images"], train["ids"])
        per_pool = distance_maps(detector, train["images"], test["images"], args.pools, args.distances)
        row = {"key": key, "setting": args.setting, "noise": args.noise, "seed": seed, "category": category}
        row |= {"method": method, "seconds": round(time.perf_counter() - started, 1), "pools": args.pools}
        levels = {name: LEVELS[name] for name in args.levels}
        for (pool, distance), (name, chosen), (kind, fraction), sigma in product(
            per_pool, levels.items(), score_kinds(args.tops).items(), args.sigmas
        ):
            maps = gaussian_blur(sum(per_pool[(pool, distance)][i] for i in chosen), sigma)
            scores = image_scores(maps, fraction)
            metrics = compute_metrics(scores.numpy(), test["labels"], maps.numpy(), test["masks"])
            variant = f"L{name}-{kind}-s{sigma:g}" + (f"-p{pool}" if pool > 1 else "")
            variant += "" if distance == "cos" else f"-d{distance}"
            row[variant] = {m: round(float(metrics[m]), 4) for m in ("image_auroc", "pixel_auroc")}
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        best = max((v["image_auroc"], k) for k, v in row.items() if isinstance(v, dict))
        base = row["L123-max-s4"]["image_auroc"]
        print(f"{key}: default {base:.3f}, best {best[1]} {best[0]:.3f} ({row['seconds']} s)", flush=True)


def report(args) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
    groups: dict = defaultdict(list)
    for row in rows:
        groups[(row["setting"], row["noise"], row["method"], tuple(row.get("pools", [1])))].append(row)
    for (setting, noise, method, _), items in groups.items():
        variants = [k for k, v in items[0].items() if isinstance(v, dict)]
        print(f"\n{setting}, noise {noise}, {method}: {len(items)} runs (category x seed); image AUROC")
        print("| variant | mean +- std over seeds | worst run | paired vs L123-max-s4 | pixel AUROC |")
        print("|---|---:|---:|---:|---:|")
        seeds = sorted({r["seed"] for r in items})
        for variant in variants:
            per_seed = [np.mean([r[variant]["image_auroc"] for r in items if r["seed"] == s]) for s in seeds]
            base = [
                np.mean([r["L123-max-s4"]["image_auroc"] for r in items if r["seed"] == s]) for s in seeds
            ]
            diff = np.asarray(per_seed) - np.asarray(base)
            worst = min(r[variant]["image_auroc"] for r in items)
            pixel = np.mean([r[variant]["pixel_auroc"] for r in items])
            spread = f"{np.std(per_seed, ddof=1):.3f}" if len(seeds) > 1 else "-"
            paired = (
                f"{diff.mean():+.3f} +- {np.std(diff, ddof=1):.3f}"
                if len(seeds) > 1
                else f"{diff.mean():+.3f}"
            )
            print(
                f"| {variant} | {np.mean(per_seed):.3f} +- {spread} | {worst:.3f} | {paired} | {pixel:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_out/rd_scoring.jsonl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--methods", nargs="+", default=["rd"], choices=["rd", "cdd"])
    parser.add_argument(
        "--setting", default="clean", choices=["clean", "scattered", "overlap", "concentrated"]
    )
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--tree", default="bench_out/photos_tree")
    parser.add_argument("--work", default="bench_out/photo_stores")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pools", type=int, nargs="+", default=[1], help="feature pooling sizes (odd)")
    parser.add_argument(
        "--distances", nargs="+", default=["cos"], choices=["cos", "l2", "cosl2"], help="include cos"
    )
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    parser.add_argument(
        "--tops", type=float, nargs="+", default=[0.01], help="top fractions of the image score (besides max)"
    )
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
