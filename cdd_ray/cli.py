"""The ``cdd-ray`` command line: prepare, train, evaluate, predict, sweep, grid, demo.

Examples::

    cdd-ray prepare synthetic --out data/synthetic --noise-ratio 0.1
    cdd-ray prepare mvtec /data/mvtec_ad --out data/mvtec --category bottle --noise-ratio 0.1
    cdd-ray train --config sweeps/base.yaml data.path=data/synthetic data.category=weave train.num_domains=3
    cdd-ray evaluate runs/weave-cdd-k3-noise0.1-seed0
    cdd-ray predict runs/weave-cdd-k3-noise0.1-seed0 img1.png img2.png --out predictions
    cdd-ray sweep sweeps/domains_and_weights.yaml data.path=data/synthetic
    cdd-ray grid sweeps/fuad_grid.yaml
    cdd-ray demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import yaml
from rich.console import Console

from cdd_ray.config import ConfigError, absolute_paths, config_from_dict, config_to_dict, load_config
from cdd_ray.data.contamination import ContaminationError
from cdd_ray.data.domains import PartitionError
from cdd_ray.data.images import BadImageError, MaskMismatchError
from cdd_ray.data.sources import SOURCE_KINDS, SourceError
from cdd_ray.data.store import StoreError
from cdd_ray.evaluate.export import ExportError
from cdd_ray.evaluate.predict import ThresholdError
from cdd_ray.models.teacher import TeacherWeightsError
from cdd_ray.ray_session import RayAddressError, ResourcesError, set_verbose
from cdd_ray.submit import SubmitError
from cdd_ray.train.checkpoint import CheckpointError
from cdd_ray.train.errors import RunDirError, TrainingError

USER_ERRORS = (
    ConfigError,
    ContaminationError,
    PartitionError,
    BadImageError,
    MaskMismatchError,
    SourceError,
    StoreError,
    TeacherWeightsError,
    CheckpointError,
    RunDirError,
    TrainingError,
    SubmitError,
    RayAddressError,
    ResourcesError,
    ThresholdError,
    ExportError,
    FileNotFoundError,
    FileExistsError,
)


def _prepare(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.data.prepare import prepare
    from cdd_ray.data.synthetic import SyntheticConfig

    synthetic = None
    if args.source == "synthetic":
        synthetic = SyntheticConfig(image_size=args.image_size, seed=args.seed)
    root = None if args.source == "synthetic" else Path(args.root or "")
    summary = prepare(
        args.source,
        root,
        Path(args.out),
        args.category or None,
        args.noise_ratio,
        args.overlap,
        args.seed,
        args.resample,
        args.skip_bad,
        Path(args.abnormal) if args.abnormal else None,
        Path(args.masks) if args.masks else None,
        synthetic,
        args.defect_type or (),
    )
    for key, count in summary["counts"].items():
        console.print(f"{key}: {count}")
    for warning in summary.get("warnings", []):
        console.print(f"[yellow]warning: {warning}[/yellow]")
    if summary["skipped"]:
        console.print(f"[yellow]skipped {len(summary['skipped'])} bad files[/yellow]")
        for message in summary["skipped"]:
            console.print(f"  {message}")
    console.print(f"store written to {Path(args.out).resolve()}")


def _train(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.evaluate.report import print_metrics_table
    from cdd_ray.train.run import run_experiment

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        check_local_resources(config)
        console.print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        console.print("configuration valid; --dry-run: nothing started")
        return
    outcome = run_experiment(config, console)
    if not outcome.metrics:
        console.print(
            f"trained; test set not scored (eval.score_test=false). Checkpoint: {outcome.checkpoint_dir}"
        )
        return
    print_metrics_table({outcome.run_dir.name: outcome.metrics}, console)
    console.print(f"metrics: {outcome.run_dir / 'metrics.json'}")


def check_local_resources(config) -> None:
    """--dry-run without RAY_ADDRESS: the run would get a local Ray with this machine's CPUs."""
    from cdd_ray.ray_session import check_resources

    if not os.environ.get("RAY_ADDRESS"):
        import torch

        use_gpu = bool(config.ray.use_gpu)
        gpus = float(torch.cuda.device_count()) if use_gpu else 0.0
        check_resources(
            config.ray.num_workers, config.ray.cpus_per_worker, use_gpu, os.cpu_count() or 1, gpus, False
        )


def _evaluate(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.evaluate.report import print_metrics_table
    from cdd_ray.train.checkpoint import load_global
    from cdd_ray.train.run import evaluate, latest_checkpoint

    run_dir = Path(args.run_dir).resolve()
    checkpoint = latest_checkpoint(run_dir)
    config = config_from_dict(load_global(checkpoint)["config"])
    metrics = evaluate(config, run_dir, checkpoint)
    print_metrics_table({run_dir.name: metrics}, console)


def _predict(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.evaluate.predict import predict_images
    from cdd_ray.train.run import latest_checkpoint

    threshold: str | float | None = "evaluated"
    if args.no_decision:
        threshold = None
    elif args.quantile is not None:
        threshold = f"quantile:{args.quantile}"
    elif args.threshold is not None:
        threshold = (
            args.threshold if args.threshold == "evaluated" else _number(args.threshold, "--threshold")
        )
    run_dir = Path(args.run_dir)
    rows = predict_images(
        run_dir, latest_checkpoint(run_dir), [Path(p) for p in args.images], Path(args.out), threshold
    )
    for row in rows:
        decision = "" if row["anomalous"] is None else ("anomalous" if row["anomalous"] else "normal")
        console.print(f"{row['image']}\t{row['score']:.5f}\t{decision}", markup=False)
    console.print(f"predictions: {Path(args.out).resolve() / 'predictions.csv'} (and .json, maps, masks)")


def _number(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError as error:
        raise ConfigError(f"{option} {text!r}: give a number or 'evaluated'") from error


def _export(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.evaluate.export import export_run
    from cdd_ray.train.run import latest_checkpoint

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "export"
    path = export_run(run_dir, latest_checkpoint(run_dir), args.format, out)
    console.print(f"exported {args.format}: {path.resolve()} (details in {path.parent / 'export.json'})")


def _sweep(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.tune.spec import load_sweep
    from cdd_ray.tune.sweep import check_resume, experiment_dir, run_sweep, sweep_record

    spec = load_sweep(Path(args.spec), args.overrides)
    if args.dry_run:
        base = load_config(spec.base_config, spec.overrides)
        check_local_resources(base)
        if args.resume:
            check_resume(experiment_dir(spec), sweep_record(spec, absolute_paths(base)), console)
            console.print(f"--resume: the settings match {experiment_dir(spec)}'s experiment")
        console.print(f"sweep {spec.name}: space {spec.search_space}, objective {spec.metric} ({spec.mode})")
        console.print("sweep and base configuration valid; --dry-run: nothing started")
        return
    outcome = run_sweep(spec, resume=args.resume, console=console)
    console.print(f"trials: {outcome['sweep_dir'] / 'trials.parquet'} and trials.csv")


def _grid(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.tune.grid import (
        cell_labels,
        check_grid_resume,
        grid_record,
        label_values,
        load_grid,
        method_configs,
        run_grid,
        trial_cost,
    )
    from cdd_ray.tune.sweep import experiment_dir

    spec = load_grid(Path(args.spec), args.overrides)
    if args.dry_run:
        base = absolute_paths(load_config(spec.base_config, spec.overrides))
        configs = method_configs(spec, base)  # names a method whose overrides are wrong
        for config in configs.values():
            check_local_resources(config)
        labels = cell_labels(spec)
        running = [method for method in spec.methods if any(c["method"] == method for c in labels)]
        order = sorted(running, key=lambda method: -trial_cost(configs[method]))
        left_out = math.prod(map(len, label_values(spec).values())) - len(labels)
        runs = f"{len(labels)} runs" + (f" ({left_out} left out by exclude)" if spec.exclude else "")
        console.print(f"grid {spec.name}: {runs}, started in this order: {', '.join(order)}")
        if args.resume:
            check_grid_resume(spec, grid_record(spec, base), console)  # what run_grid checks
            console.print(f"--resume: the data and settings match {experiment_dir(spec)}'s experiment")
        console.print("grid and method configurations valid; --dry-run: nothing started")
        return
    outcome = run_grid(spec, resume=args.resume, console=console)
    console.print(f"summary: {outcome['summary_markdown']}")


def _photos(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.data.photos import CATEGORIES, PhotoBenchmarkConfig, write_photo_benchmark

    categories = tuple(args.category or CATEGORIES)
    config = PhotoBenchmarkConfig(
        image_size=args.image_size, seed=args.seed, categories=categories, defects_at=args.defects_at
    )
    counts = write_photo_benchmark(Path(args.out), config)
    for category, per_folder in counts.items():
        console.print(
            f"{category}: " + ", ".join(f"{folder} {n}" for folder, n in sorted(per_folder.items()))
        )
    console.print(f"MVTec tree written to {Path(args.out).resolve()}")
    console.print(f"next: cdd-ray prepare mvtec {args.out} --out STORE [--noise-ratio R --overlap]")


def _demo(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, console=console, epochs=args.epochs)


def _submit(args: argparse.Namespace, console: Console) -> None:
    from cdd_ray.submit import follow_instructions, job_request, submit

    inner_args = args.inner[1:] if args.inner[:1] == ["--"] else args.inner
    if not inner_args or inner_args[0] in ("submit", "demo"):
        raise ConfigError("submit needs the cdd-ray command to run after --, e.g. `-- train --config FILE`")
    inner = build_parser().parse_args(inner_args)  # a bad inner command exits here, before any upload
    if inner.command == "train":
        load_config(inner.config, inner.overrides)
    request = job_request(inner_args, inner, Path(args.working_dir).resolve(), args.job_id)
    if args.dry_run:
        print(json.dumps(request, indent=2))  # plain: rich would wrap the JSON
        console.print(f"--dry-run: nothing submitted to {args.address}")
        return
    job_id, status = submit(request, args.address, args.follow)
    for line in follow_instructions(args.address, job_id):
        console.print(line, markup=False)
    if status is not None:
        console.print(f"job {job_id} ended: {status}")
        if status != "SUCCEEDED":
            raise JobFailedError(f"job {job_id} ended {status}")


class JobFailedError(RuntimeError):
    """A followed job ended in another state than SUCCEEDED."""


def _job_address() -> str:
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith(("http://", "https://")) else "http://127.0.0.1:8265"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdd-ray", description="Cross-Domain Distillation for FUAD on Ray")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Ray's own log lines and the workers' output too"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser(
        "prepare", help="write a Parquet store from a dataset (with FUAD contamination)"
    )
    prep.add_argument("source", choices=SOURCE_KINDS)
    prep.add_argument("root", nargs="?", help="dataset folder (normal images for 'folder')")
    prep.add_argument("--out", required=True)
    prep.add_argument("--category", action="append", help="category to keep (repeatable)")
    prep.add_argument("--noise-ratio", type=float, default=0.0)
    prep.add_argument("--overlap", action="store_true", help="keep injected anomalies in the test set too")
    prep.add_argument("--resample", action="store_true", help="augmented copies when anomalies run short")
    prep.add_argument(
        "--defect-type",
        action="append",
        help="inject only anomalies of this defect type (repeatable): concentrated contamination",
    )
    prep.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (counted) instead of failing"
    )
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--abnormal", help="folder source: the abnormal images")
    prep.add_argument("--masks", help="folder source: masks named like the abnormal images")
    prep.add_argument("--image-size", type=int, default=128, help="synthetic source: image size")
    prep.set_defaults(handler=_prepare)

    train = commands.add_parser("train", help="train and evaluate one run (key=value overrides)")
    train.add_argument("--config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.num_domains=3")
    train.add_argument("--dry-run", action="store_true", help="check the configuration, start nothing")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="score the test set with a run's last checkpoint")
    evaluate.add_argument("run_dir")
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser("predict", help="scores, decisions, region masks and maps for new images")
    predict.add_argument("run_dir")
    predict.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    predict.add_argument("--out", required=True)
    decide = predict.add_mutually_exclusive_group()
    decide.add_argument(
        "--threshold",
        help="decision threshold in score units, or 'evaluated' (default: the run's F1-max thresholds)",
    )
    decide.add_argument(
        "--quantile", type=float, help="label-free threshold: this quantile of the held-out images' scores"
    )
    decide.add_argument("--no-decision", action="store_true", help="scores and maps only")
    predict.set_defaults(handler=_predict)

    export = commands.add_parser("export", help="the run's detector as one TorchScript or ONNX file")
    export.add_argument("run_dir")
    export.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    export.add_argument("--out", help="folder for the file (default: RUN_DIR/export)")
    export.set_defaults(handler=_export)

    sweep = commands.add_parser("sweep", help="Ray Tune over domain count and loss weights")
    sweep.add_argument("spec", help="sweep YAML, e.g. sweeps/domains_and_weights.yaml")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides of the trials' run config")
    sweep.add_argument("--resume", action="store_true", help="finish an interrupted sweep")
    sweep.add_argument("--dry-run", action="store_true", help="check the sweep and its config, start nothing")
    sweep.set_defaults(handler=_sweep)

    grid = commands.add_parser("grid", help="category x noise x overlap x seed x method benchmark grid")
    grid.add_argument("spec", help="grid YAML, e.g. sweeps/fuad_grid.yaml")
    grid.add_argument("overrides", nargs="*", help="dotted overrides of the trials' run config")
    grid.add_argument("--resume", action="store_true", help="finish an interrupted grid")
    grid.add_argument("--dry-run", action="store_true", help="check the grid and its configs, start nothing")
    grid.set_defaults(handler=_grid)

    photos = commands.add_parser(
        "photo-benchmark", help="write the photo benchmark (real photographs, drawn defects) as an MVTec tree"
    )
    photos.add_argument("--out", required=True, help="a new folder")
    photos.add_argument("--category", action="append", help="tissue, lunar, retina, deepfield (repeatable)")
    photos.add_argument("--image-size", type=int, default=128)
    photos.add_argument("--seed", type=int, default=0)
    photos.add_argument(
        "--defects-at",
        choices=("middle", "edge"),  # cdd_ray.data.photos.PLACEMENTS (not imported: scipy at start-up)
        default="middle",
        help="middle (the benchmark's) or edge: every defect next to a side of the image",
    )
    photos.set_defaults(handler=_photos)

    demo = commands.add_parser(
        "demo",
        help="RD, CDD, PatchCore, SoftPatch on the photo benchmark, clean and 20%% contaminated "
        "(CDD contaminated only)",
    )
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--quick", action="store_true", help="tiny images, sets and epochs (tests)")
    demo.add_argument(
        "--epochs",
        type=int,
        help="RD's and CDD's train.epochs (default: the shipped train.epochs, 100)",
    )
    demo.set_defaults(handler=_demo)

    submit = commands.add_parser(
        "submit",
        help="run a cdd-ray command as a Ray job: cdd-ray submit --address URL -- train ...",
    )
    submit.add_argument(
        "--address",
        default=_job_address(),
        help="the cluster's dashboard (job API) address, http://HOST:8265 (default: RAY_ADDRESS when it "
        "has that http form, else http://127.0.0.1:8265). A driver's RAY_ADDRESS is the GCS "
        "address (HOST:6379) instead",
    )
    submit.add_argument("--job-id", help="submission id (default: derived from the command)")
    submit.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir")
    submit.add_argument("--follow", action="store_true", help="stream the logs; exit with the job's status")
    submit.add_argument("--dry-run", action="store_true", help="check and print the job, submit nothing")
    submit.add_argument("inner", nargs=argparse.REMAINDER, help="-- then the cdd-ray command to run")
    submit.set_defaults(handler=_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    console = Console()
    try:
        args.handler(args, console)
    except (*USER_ERRORS, JobFailedError) as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
