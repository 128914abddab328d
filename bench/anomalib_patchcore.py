"""cdd-ray's PatchCore against anomalib 2.7's, on the same inputs (run through bench/anomalib_compare.sh).

Same teacher weights (the offline tf_efficientnet_lite0 ImageNet weights, loaded into anomalib's
timm feature extractor), same levels (timm out_indices 2 and 3: strides 8 and 16), same images
(the photo benchmark through the MVTec reader, 128 px), 10 % coreset, 9 neighbours for the
reweighting, the same metric code on both outputs. Differences that remain by design: anomalib
projects features with a sparse random projection (eps 0.9) for its coreset, we with a Gaussian
one to 128 dimensions; anomalib upsamples patch scores with nearest-neighbour interpolation, we
bilinearly; both blur with sigma 4.

Run: bash bench/anomalib_compare.sh patchcore [--settings clean overlap] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from photo_quality import store_for  # noqa: E402
from synthetic_quality import load  # noqa: E402

from cdd_ray.config import load_config  # noqa: E402
from cdd_ray.data.photos import CATEGORIES, PhotoBenchmarkConfig, write_photo_benchmark  # noqa: E402
from cdd_ray.evaluate.metrics import compute_metrics  # noqa: E402
from cdd_ray.models.detector import score_in_batches  # noqa: E402
from cdd_ray.models.teacher import TeacherConfig, build_backbone, build_teacher  # noqa: E402
from cdd_ray.train.fit import fit_memory_bank_detector  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc")


def ours(teacher, train: torch.Tensor, test: torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    config = load_config(None, ["method=patchcore", f"train.seed={seed}"])
    started = time.perf_counter()
    detector, _ = fit_memory_bank_detector(config, teacher, train)
    maps, scores = score_in_batches(detector, test)
    return maps.numpy(), scores.numpy(), time.perf_counter() - started


def theirs(
    teacher, train: torch.Tensor, test: torch.Tensor, seed: int, weights: dict[str, torch.Tensor]
) -> tuple[np.ndarray, np.ndarray, float]:
    """``weights``: the whole lite0 backbone's state dict (cdd-ray's teacher has its unread
    stride-32 blocks cut, anomalib's extractor has them)."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    torch.manual_seed(seed)
    model = PatchcoreModel(
        layers=[2, 3], backbone="tf_efficientnet_lite0", pre_trained=False, num_neighbors=9
    )
    extractor = model.feature_extractor.feature_extractor
    missing, unexpected = extractor.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not map onto anomalib's extractor: {missing[:3]} {unexpected[:3]}")
    normalize = lambda images: (images - teacher.mean) / teacher.std  # noqa: E731
    started = time.perf_counter()
    model.train()
    with torch.no_grad():
        for start in range(0, len(train), 32):
            model(normalize(train[start : start + 32]))
    model.subsample_embedding(0.1)
    model.eval()
    maps, scores = [], []
    with torch.no_grad():
        for start in range(0, len(test), 16):
            out = model(normalize(test[start : start + 16]))
            maps.append(out.anomaly_map.squeeze(1))
            scores.append(out.pred_score.flatten())
    return torch.cat(maps).numpy(), torch.cat(scores).numpy(), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", nargs="+", default=["clean"], choices=["clean", "overlap", "scattered"])
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--tree", default="bench_out/photos_tree")
    parser.add_argument("--work", default="bench_out/photo_stores")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tree = Path(args.tree)
    if not tree.exists():
        write_photo_benchmark(tree, PhotoBenchmarkConfig())
    teacher_config = TeacherConfig()
    teacher = build_teacher(teacher_config)
    whole_weights = build_backbone(teacher_config).state_dict()  # the same weights, no block cut
    header = "| setting | category | seed | cdd-ray image / pixel AUROC | anomalib | difference | seconds |"
    print(header + "\n|---|---|---:|---:|---:|---:|---:|")
    differences = []
    for setting in args.settings:
        noise = 0.0 if setting == "clean" else args.noise
        for seed in args.seeds:
            store = store_for(tree, Path(args.work), setting, noise, seed)
            for category in args.categories:
                train, test = load(store, category, "train", 128), load(store, category, "test", 128)
                results = {}
                for name, run in (("ours", ours), ("theirs", partial(theirs, weights=whole_weights))):
                    maps, scores, seconds = run(teacher, train["images"], test["images"], seed)
                    metrics = compute_metrics(scores, test["labels"], maps, test["masks"])
                    results[name] = ([metrics[m] for m in METRICS], seconds)
                (a, sa), (b, sb) = results["ours"], results["theirs"]
                differences.append([x - y for x, y in zip(a, b, strict=True)])
                cells = [f"{a[0]:.3f} / {a[1]:.3f}", f"{b[0]:.3f} / {b[1]:.3f}"]
                cells.append(f"{a[0] - b[0]:+.3f} / {a[1] - b[1]:+.3f}")
                print(
                    f"| {setting} | {category} | {seed} | " + " | ".join(cells) + f" | {sa:.1f} / {sb:.1f} |",
                    flush=True,
                )
    mean = np.mean(differences, axis=0)
    worst = np.abs(differences).max(axis=0)
    print(
        f"\nmean difference (ours - anomalib): image {mean[0]:+.4f}, pixel {mean[1]:+.4f}; "
        f"largest |difference|: image {worst[0]:.4f}, pixel {worst[1]:.4f}"
    )


if __name__ == "__main__":
    main()
