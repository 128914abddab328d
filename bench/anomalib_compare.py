"""cdd-ray against anomalib, side by side in one process (run through bench/anomalib_compare.sh).

1. RD training-step throughput: cdd-ray's plain RD step (CDDEngine, K = 1, teacher features computed
   every step, no cache) against anomalib's ReverseDistillationModel + ReverseDistillationLoss with
   the Adam settings of its Lightning module, same timm backbone, image size, batch size, threads.
   Rounds alternate (ours, theirs, ours, ...) so that machine noise hits both; medians are reported.
   Random backbone weights on both sides (speed does not depend on them; no download).
2. AUPRO on the same maps (bench/aupro_speed.make_case): values and seconds, plus the slow
   1000-threshold reference.

Run: bash bench/anomalib_compare.sh [--backbone resnet18] [--size 128] [--batch 8] [--steps 12]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from aupro_speed import make_case, reference_grid_aupro  # noqa: E402

from cdd_ray.evaluate.metrics import aupro  # noqa: E402
from cdd_ray.models.distillation.losses import ObjectiveConfig  # noqa: E402
from cdd_ray.models.distillation.student import student_spec  # noqa: E402
from cdd_ray.models.teacher import TeacherConfig, build_teacher  # noqa: E402
from cdd_ray.train.engine import CDDEngine, OptimConfig  # noqa: E402


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ours(backbone: str, batch: torch.Tensor, embedding_width_factor: int | None = None):
    """cdd-ray's RD step; ``embedding_width_factor=1`` builds anomalib's narrower OCBE (same layers
    otherwise), so that the two libraries can be compared on the same network too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = build_teacher(TeacherConfig(backbone=backbone, pretrained=False))
    spec = replace(
        student_spec(teacher.channels, teacher.reductions, backbone),
        embedding_width_factor=embedding_width_factor,
    )
    engine = CDDEngine.create(teacher, spec, 1, ObjectiveConfig(), OptimConfig(), seed=0)
    domains = torch.zeros(len(batch), dtype=torch.long)
    return (lambda: engine.global_step(batch, domains)), parameters(engine.global_student)


def theirs(backbone: str, batch: torch.Tensor, size: int):
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    model = ReverseDistillationModel(
        backbone=backbone,
        input_size=(size, size),
        layers=["layer1", "layer2", "layer3"],
        anomaly_map_mode="multiply",
        pre_trained=False,
    )
    loss_fn = ReverseDistillationLoss()
    trained = list(model.decoder.parameters()) + list(model.bottleneck.parameters())
    # anomalib's OCBE keeps RD4AD's conv4/bn4, which its forward never calls: no gradient, no work
    unused = sum(
        p.numel() for name, p in model.bottleneck.named_parameters() if name.startswith(("conv4", "bn4"))
    )
    optimizer = torch.optim.Adam(trained, lr=0.005, betas=(0.5, 0.99))  # anomalib's configure_optimizers
    model.train()

    def step() -> float:
        encoder_features, decoder_features = model(batch)
        loss = loss_fn(encoder_features, decoder_features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in trained) - unused


def timed(step, steps: int, images: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--maps", type=int, default=100)
    args = parser.parse_args()
    import anomalib

    torch.manual_seed(0)
    batch = torch.rand(args.batch, 3, args.size, args.size)
    contestants = {
        "cdd-ray": ours(args.backbone, batch),
        "cdd-ray, anomalib's OCBE width": ours(args.backbone, batch, embedding_width_factor=1),
        "anomalib": theirs(args.backbone, batch, args.size),
    }
    if contestants["cdd-ray"][1] == contestants["cdd-ray, anomalib's OCBE width"][1]:
        del contestants["cdd-ray, anomalib's OCBE width"]  # the same network (width factor 1 already)
    for step, _ in contestants.values():  # warm-up
        step()
    rates: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(args.rounds):
        for name, (step, _) in contestants.items():
            rates[name].append(timed(step, args.steps, args.batch))
    print(
        f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"anomalib {anomalib.__version__}"
    )
    print(
        f"\nRD training step, {args.backbone}, {args.size} px, batch {args.batch}, "
        f"{args.rounds} x {args.steps} steps"
    )
    print("| implementation | trained parameters | images/s (median) | rounds |\n|---|---:|---:|---|")
    for name, (_, params) in contestants.items():
        values = ", ".join(f"{v:.1f}" for v in rates[name])
        print(f"| {name} | {params:,} | {statistics.median(rates[name]):.1f} | {values} |")
    for name in contestants:
        if name != "anomalib":
            ratio = statistics.median(rates[name]) / statistics.median(rates["anomalib"])
            print(f"ratio {name} / anomalib: {ratio:.2f}")

    from anomalib.metrics.aupro import _AUPRO

    maps, masks = make_case(args.maps, 256)
    started = time.perf_counter()
    value_ours = aupro(maps, masks)
    seconds_ours = time.perf_counter() - started
    metric = _AUPRO(fpr_limit=0.3)
    started = time.perf_counter()
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks).long())
    value_theirs = float(metric.compute())
    seconds_theirs = time.perf_counter() - started
    started = time.perf_counter()
    value_reference = reference_grid_aupro(maps, masks, 1000)
    seconds_reference = time.perf_counter() - started
    print(f"\nAUPRO on {args.maps} maps of 256x256 (fpr limit 0.3)")
    print("| implementation | AUPRO | seconds |\n|---|---:|---:|")
    print(f"| cdd-ray exact | {value_ours:.5f} | {seconds_ours:.2f} |")
    print(f"| anomalib {anomalib.__version__} AUPRO | {value_theirs:.5f} | {seconds_theirs:.2f} |")
    print(f"| 1000-threshold reference | {value_reference:.5f} | {seconds_reference:.2f} |")
    print(f"|cdd-ray - anomalib| = {abs(value_ours - value_theirs):.2e}")


if __name__ == "__main__":
    main()
