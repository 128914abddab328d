"""GPU figures only a device can give: WRN50 teacher at 256 px, RD and CDD training throughput in fp32
and bf16 autocast, peak GPU memory, and evaluate (scoring) throughput. In-process torch only (no Ray),
so it runs with the device machine's own python3, torch and timm: `PYTHONPATH=. python3 bench/gpu_check.py`.

Random teacher weights (the device machine reaches no weight hub; speed does not depend on them).
Each measurement runs a fixed number of steps after warm-up, synchronizing the device around timing.
CPU smoke test: python bench/gpu_check.py --device cpu --backbone resnet18 --size 64 --steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
import warnings

import torch

from cdd_ray.models.detector import DistillationDetector, score_in_batches
from cdd_ray.models.distillation.losses import ObjectiveConfig
from cdd_ray.models.distillation.student import student_spec
from cdd_ray.models.teacher import TeacherConfig, build_teacher
from cdd_ray.train.engine import CDDEngine, OptimConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(step, steps: int, images: int, device: torch.device) -> float:
    step()  # warm-up (cuDNN autotuning, allocator)
    step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * images / (time.perf_counter() - started)


def engine_for(teacher, backbone: str, k: int) -> CDDEngine:
    """Students and EMA on the teacher's device (``CDDEngine.create``)."""
    spec = student_spec(teacher.channels, teacher.reductions, backbone)
    return CDDEngine.create(teacher, spec, k, ObjectiveConfig(), OptimConfig(), seed=0)


def rd_step(engine: CDDEngine, images, domains, device, dtype) -> None:
    with autocast(device, dtype):
        engine.global_step(images, torch.zeros_like(domains))


def cdd_step(engine: CDDEngine, images, domains, device, dtype) -> None:
    """One DST step per domain (half a batch each), then one aggregation step on the whole batch."""
    with autocast(device, dtype):
        for k in (0, 1):
            engine.domain_step(k, images[domains == k])
        engine.global_step(images, domains)


def score_under(device, dtype, teacher, scorer, test) -> None:
    with autocast(device, dtype):
        score_in_batches(DistillationDetector(teacher, scorer), test, batch_size=32)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 2)


def train_figures(teacher, args, images, domains, device, dtype: str) -> dict:
    """images/s of RD and CDD (K=2) training steps, each image counted once per step, and peak memory."""
    figures = {}
    peak_gib(device)
    for name, k, step in (("rd", 1, rd_step), ("cdd_k2", 2, cdd_step)):
        engine = engine_for(teacher, args.backbone, k)
        run = functools.partial(step, engine, images, domains, device, dtype)
        figures[f"{name}_train_images_per_s_{dtype}"] = round(measure(run, args.steps, args.batch, device), 1)
        figures[f"{name}_peak_memory_gib_{dtype}"] = peak_gib(device)
        del engine, run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = build_teacher(TeacherConfig(backbone=args.backbone, pretrained=False)).to(device)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    domains = torch.arange(args.batch, device=device) % 2
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "backbone": args.backbone,
        "size": args.size,
        "batch": args.batch,
    }
    for dtype in ("fp32", "bf16"):
        results |= train_figures(teacher, args, images, domains, device, dtype)
    scorer = engine_for(teacher, args.backbone, 1).global_student
    test = torch.rand(8 * args.batch, 3, args.size, args.size, device=device)
    for dtype in ("fp32", "bf16"):
        evaluate = functools.partial(score_under, device, dtype, teacher, scorer, test)
        results[f"evaluate_images_per_s_{dtype}"] = round(measure(evaluate, 3, len(test), device), 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
