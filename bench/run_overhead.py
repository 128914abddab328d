"""Where the wall time of one small ``cdd-ray train`` goes: fixed cost against training, before and after.

Each measured run is a fresh process (its own local Ray, as a user's ``cdd-ray train``) running
``run_experiment`` on a small synthetic store (one category, 60 + 6 training images, 128 px,
tf_efficientnet_lite0, CDD K = 2, 2 workers of 1 CPU, ``train.epochs`` small). Runs of the trees
given alternate, so both see the same machine load.

Phases (from the driver's and the workers' timed trace events, this tree's code only):
Ray start, dataset materialization, worker start until the loop runs (process start, imports),
loop start until the first step (teacher, data), training (the steps themselves), reporting and
checkpointing, test-set scoring, Train shutdown (last report to ``fit()`` returning), and the driver
after ``fit()``. For a tree without trace events (``--before``), the split is total, training (sum
of the reported epoch times) and everything else.

Fixed cost = total - training.

Run:
    git worktree add ../cdd-before 6f10313        # the code before the fixed-cost work
    .venv/bin/python bench/run_overhead.py --before ../cdd-before --repeats 2

``--also KEY=VALUE ...`` adds a run of this tree with those overrides to each round (e.g.
``data.object_store_mb=0``: the workers read the Parquet store, nothing is materialized).
``--bare`` adds Ray Train's own floor to each round: Ray started as a run starts it, then a
``TorchTrainer`` with the same scaling (2 workers of 1 CPU) whose loop only reports once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
BARE = "<bare TorchTrainer>"  # marks the empty-loop run among a tree's extra arguments
PHASES = (
    "ray start",
    "materialize datasets",
    "worker start to loop",
    "loop to first step",
    "training",
    "report + checkpoint",
    "test scoring",
    "Train shutdown",
    "driver after fit",
)


def child(args) -> None:
    """One measured run in this process; prints one JSON line."""
    from rich.console import Console

    from cdd_ray.config import load_config
    from cdd_ray.data.prepare import prepare
    from cdd_ray.data.synthetic import SyntheticConfig
    from cdd_ray.train.run import run_experiment

    work = Path(args.work)
    store = work / "store"
    if not (store / "store.json").is_file():
        prepare("synthetic", None, store, ["weave"], noise_ratio=0.1, synthetic=SyntheticConfig())
    trace = Path(tempfile.mkdtemp(prefix="trace", dir=work))
    overrides = [
        f"data.path={store}",
        "data.category=weave",
        f"train.epochs={args.epochs}",
        f"train.num_domains={args.domains}",
        f"ray.storage_path={work / 'runs'}",
        f"name=run-{trace.name}",
        "ray.num_workers=2",
        *args.override,
    ]
    config = load_config(None, overrides)
    started = time.time()
    outcome = run_experiment(config, Console(quiet=True), trace_dir=str(trace))
    total = time.time() - started
    reports = [json.loads(line) for line in (outcome.run_dir / "progress.jsonl").read_text().splitlines()]
    result = {"total": total, "training_reported": sum(r["epoch_time_s"] for r in reports)}
    result["image_auroc"] = outcome.metrics.get("image_auroc")
    result |= phases(trace)
    print("RESULT " + json.dumps(result), flush=True)


def bare_child(args) -> None:
    """The floor: Ray started as a run starts it, then a TorchTrainer with the run's scaling (2
    workers of 1 CPU) whose loop only reports once; prints one JSON line as ``child``."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cdd_ray.ray_session import ensure_ray

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    marker = work / f"loop-{time.time_ns()}"
    started = time.time()
    ensure_ray()
    ready = time.time()

    def loop(config: dict) -> None:
        if ray.train.get_context().get_world_rank() == 0:
            Path(config["marker"]).write_text(str(time.time()))
        ray.train.report({"done": 1})

    trainer = TorchTrainer(
        loop,
        train_loop_config={"marker": str(marker)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1.0}),
        run_config=RunConfig(name=marker.name, storage_path=str(work / "runs")),
    )
    fit_start = time.time()
    trainer.fit()
    end = time.time()
    in_loop = float(marker.read_text())
    result = {
        "total": end - started,
        "training_reported": 0.0,
        "ray start": ready - started,
        "worker start to loop": in_loop - fit_start,
        "Train shutdown": end - in_loop,
    }
    print("RESULT " + json.dumps(result), flush=True)


def phases(trace: Path) -> dict:
    driver_file = trace / "driver.jsonl"
    if not driver_file.is_file():
        return {}
    driver = {e["event"]: e["t"] for e in map(json.loads, driver_file.read_text().splitlines())}
    rank0 = [json.loads(line) for line in (trace / "rank0.jsonl").read_text().splitlines()]
    timed = [e for e in rank0 if e.get("stage") == "timing"]

    def first(event: str) -> float:
        return min(e["t"] for e in timed if e["event"] == event)

    def spans(start: str, end: str) -> float:
        starts = [e for e in timed if e["event"] == start]
        ends = [e for e in timed if e["event"] == end]
        return sum(b["t"] - a["t"] for a, b in zip(starts, ends, strict=True))

    scoring = spans("scoring", "scored")
    last_reported = max(e["t"] for e in timed if e["event"] == "reported")
    return {
        "ray start": driver["ray_ready"] - driver["start"],
        "materialize datasets": driver["data_ready"] - driver["ray_ready"],
        "worker start to loop": first("loop_start") - driver["fit_start"],
        "loop to first step": first("step_start") - first("loop_start"),
        "training": spans("step_start", "step_trained"),
        "report + checkpoint": spans("report", "reported"),
        "test scoring": scoring,
        "Train shutdown": driver["fit_end"] - last_reported,
        "driver after fit": driver["end"] - driver["fit_end"],
    }


def parent(args) -> None:
    trees = {"this tree": (HERE, [])}
    if args.before:
        trees = {"before": (Path(args.before).resolve(), []), **trees}
    if args.also:
        trees[f"this tree, {' '.join(args.also)}"] = (HERE, args.also)
    if args.bare:
        trees["bare TorchTrainer, empty loop"] = (HERE, [BARE])
    work = Path(tempfile.mkdtemp(prefix="overhead"))
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for repeat in range(args.repeats):
        for name, (tree, extra) in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree))
            command = [
                sys.executable,
                str(HERE / "bench" / "run_overhead.py"),
                "--child",
                "--work",
                str(work / name.replace(" ", "_").replace(",", "").replace("=", "_")),
                "--epochs",
                str(args.epochs),
                "--domains",
                str(args.domains),
                *[f"--override={o}" for o in [*args.override, *extra] if o != BARE],
                *(["--bare"] if BARE in extra else []),
            ]
            output = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree, timeout=1800)
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                raise SystemExit(f"{name}: the run failed:\n{output.stderr[-3000:]}")
            results[name].append(json.loads(lines[-1][7:]))
            row = results[name][-1]
            timing = f"total {row['total']:.1f} s, training {row['training_reported']:.1f} s"
            print(f"repeat {repeat + 1} {name}: {timing}", flush=True)
    print(f"\nmean over {args.repeats} runs (seconds); fixed cost = total - training\n")
    print("| | " + " | ".join(trees) + " |\n|---|" + "---:|" * len(trees))
    keys = ["total", "training_reported", *PHASES]
    for key in keys:
        cells = []
        for name in trees:
            values = [r[key] for r in results[name] if key in r]
            cells.append(f"{np.mean(values):.1f}" if values else "-")
        print(f"| {key} | " + " | ".join(cells) + " |")
    cells = [f"{np.mean([r['total'] - r['training_reported'] for r in results[n]]):.1f}" for n in trees]
    print("| **fixed cost** | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="a checkout of the code to compare with (e.g. a git worktree)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--domains", type=int, default=2)
    parser.add_argument("--override", action="append", default=[], help="more dotted config overrides")
    parser.add_argument(
        "--also", nargs="+", default=[], help="overrides of a third run of this tree, side by side"
    )
    parser.add_argument(
        "--bare", action="store_true", help="add a run of an empty TorchTrainer loop: Ray Train's own floor"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:
        parent(args)
    elif args.bare:
        bare_child(args)
    else:
        child(args)


if __name__ == "__main__":
    main()
