"""PatchCore's memory bank at MVTec scale: time and memory of each step, and the nearest-neighbour
backends side by side (torch against faiss, alternating rounds on the same bank and queries).

Default: 250 training images of the photo benchmark's ``lunar`` category at 256 px (an MVTec AD
category has 200-400), tf_efficientnet_lite0 teacher, 10 % coreset, one process.

Run: .venv/bin/python bench/memory_bank_scale.py [--images 250] [--size 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cdd_ray.data.photos import PHOTOS, load_photo, normal_crop
from cdd_ray.models.patchcore.memory_bank import nearest_neighbours
from cdd_ray.models.patchcore.model import MemoryBankConfig, build_memory_bank
from cdd_ray.models.teacher import TeacherConfig, build_teacher
from cdd_ray.train.fit import training_patch_features


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    photo = PHOTOS["lunar"]
    pixels = load_photo(photo.name)
    rng = np.random.default_rng(0)
    images = np.stack([normal_crop(pixels, photo, rng, args.size) for _ in range(args.images + 16)])
    images = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))
    train, queries_images = images[: args.images], images[args.images :]
    teacher = build_teacher(TeacherConfig())
    threads = torch.get_num_threads()
    print(f"{platform.machine()}, torch threads {threads}, {args.images} images at {args.size} px")

    started = time.perf_counter()
    features = training_patch_features(teacher, train)
    extract = time.perf_counter() - started
    patches = features.shape[0] * features.shape[2] * features.shape[3]
    print(
        f"features: {tuple(features.shape)} = {patches} patches x {features.shape[1]} dims, "
        f"{features.numel() * 4 / 1024**2:.0f} MiB, {extract:.1f} s ({args.images / extract:.1f} images/s)"
    )
    for denoise in (False, True):
        started = time.perf_counter()
        bank, summary = build_memory_bank(features, MemoryBankConfig(), denoise=denoise, seed=0)
        name = "SoftPatch (LOF, 15 % dropped)" if denoise else "PatchCore"
        print(
            f"{name} bank: {summary}, {bank.features.numel() * 4 / 1024**2:.1f} MiB, "
            f"built in {time.perf_counter() - started:.1f} s"
        )
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bank.pt"
        bank.save(path)
        print(f"saved bank: {path.stat().st_size / 1024**2:.1f} MiB on disk")

    queries = (
        training_patch_features(teacher, queries_images).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    )
    timings: dict[str, list[float]] = {"torch": [], "faiss": []}
    results = {}
    for _ in range(args.rounds):
        for search in timings:
            started = time.perf_counter()
            results[search] = nearest_neighbours(bank.features, queries, 1, search)
            timings[search].append(time.perf_counter() - started)
    same = bool(torch.equal(results["torch"][1], results["faiss"][1]))
    agree = float((results["torch"][1] == results["faiss"][1]).float().mean())
    per_image = {k: statistics.median(v) / len(queries_images) * 1000 for k, v in timings.items()}
    print(
        f"nearest neighbour of {len(queries)} query patches ({len(queries_images)} images) in a bank of "
        f"{len(bank.features)}: torch {per_image['torch']:.1f} ms/image, "
        f"faiss {per_image['faiss']:.1f} ms/image "
        f"(torch/faiss time ratio {per_image['torch'] / per_image['faiss']:.2f}); same neighbours: {same} "
        f"({agree:.4f} of queries)"
    )
    print(f"peak RSS of this process: {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
