"""Peak memory of a Ray Train worker and object-store use as the training set grows, two trees side by side.

For each training-set size (synthetic generator, one category, 128 px), each tree runs one
``cdd-ray train`` in a fresh process (its own local Ray): CDD K = 2, one epoch, 2 workers of 1 CPU,
test-set scoring off. While it runs, this process samples every Ray Train worker's
``/proc/<pid>/status`` every 0.2 s and keeps the peaks of

- ``VmRSS``: resident memory, which also counts the object-store pages a worker has mapped;
- ``RssAnon``: the worker's private memory (arrays it holds, the teacher cache, torch);
- ``RssShmem``: object-store (shared-memory) pages mapped by the worker.

Object-store use is the size of every dataset the driver materializes (``size_bytes()`` of the
result of each ``Dataset.materialize``, recorded by a patch in the child process), and images/s is
the epoch's reported ``images_per_second``.

Run (about 15 minutes on 2 cores; the default teacher is the tiny random ``test_resnet`` so the
data, not the model, fills the worker; ``--override teacher.backbone=...`` changes that):

    git worktree add ../cdd-head <commit before streaming>
    .venv/bin/python bench/worker_memory.py --before ../cdd-head --sizes 1000 4000 16000

``--also KEY=VALUE ...`` adds a run of this tree with those overrides beside the others (e.g.
``data.object_store_mb=0``: every worker reads its rows from the Parquet store).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
FIELDS = ("VmRSS", "RssAnon", "RssShmem")


def child(args) -> None:
    """One run in this process; prints one RESULT JSON line."""
    import ray.data
    from rich.console import Console

    from cdd_ray.config import load_config
    from cdd_ray.train.run import run_experiment

    materialized: list[int] = []
    original = ray.data.Dataset.materialize

    def materialize(self, *a, **k):
        result = original(self, *a, **k)
        materialized.append(int(result.size_bytes()))
        return result

    ray.data.Dataset.materialize = materialize
    work = Path(args.work)
    overrides = [
        f"data.path={args.store}",
        "data.category=weave",
        "data.image_size=128",
        "teacher.backbone=test_resnet",
        "teacher.pretrained=false",
        "train.epochs=1",
        "train.num_domains=2",
        "ray.num_workers=2",
        "ray.cpus_per_worker=1",
        "eval.score_test=false",
        "eval.report=false",
        f"ray.storage_path={work / 'runs'}",
        f"name=mem-{os.getpid()}",
        *args.override,
    ]
    config = load_config(None, overrides)
    started = time.time()
    outcome = run_experiment(config, Console(quiet=True))
    reports = [json.loads(line) for line in (outcome.run_dir / "progress.jsonl").read_text().splitlines()]
    result = {
        "total_s": time.time() - started,
        "object_store_mb": sum(materialized) / 2**20,
        "images_per_second": [r["images_per_second"] for r in reports],
        "teacher_cache_mb": reports[-1].get("teacher_cache_mb"),
    }
    print("RESULT " + json.dumps(result), flush=True)


def read_status(pid: int) -> dict[str, int] | None:
    try:
        if b"RayTrainWorker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0]) * 1024
    return values


class Sampler(threading.Thread):
    """Peaks of each field over every Ray Train worker process seen while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks = dict.fromkeys(FIELDS, 0)
        self.workers: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for entry in os.listdir("/proc"):
                if entry.isdigit() and (values := read_status(int(entry))):
                    self.workers.add(int(entry))
                    for key, value in values.items():
                        self.peaks[key] = max(self.peaks[key], value)
            self.stop.wait(0.2)


def make_store(path: Path, size: int) -> None:
    from cdd_ray.data.prepare import prepare
    from cdd_ray.data.synthetic import SyntheticConfig

    if (path / "store.json").is_file():
        return
    synthetic = SyntheticConfig(image_size=128, train_normal=size, test_normal=4, test_anomalous=4)
    prepare("synthetic", None, path, ["weave"], noise_ratio=0.0, synthetic=synthetic)


def parent(args) -> None:
    trees = {"this tree": (HERE, [])}
    if args.before:
        trees = {"before": (Path(args.before).resolve(), []), **trees}
    if args.also:
        trees[f"this tree, {' '.join(args.also)}"] = (HERE, args.also)
    work = Path(args.work or tempfile.mkdtemp(prefix="wmem")).resolve()
    rows = []
    for size in args.sizes:
        store = work / f"store{size}"
        started = time.time()
        make_store(store, size)
        print(f"{size} images: store ready in {time.time() - started:.0f} s", flush=True)
        for name, (tree, extra) in trees.items():
            sampler = Sampler()
            sampler.start()
            command = [
                sys.executable,
                str(HERE / "bench" / "worker_memory.py"),
                "--child",
                "--work",
                str(work / name.split(",")[0].replace(" ", "_")),
                "--store",
                str(store),
                *[f"--override={o}" for o in [*args.override, *extra]],
            ]
            env = dict(os.environ, PYTHONPATH=str(tree))
            output = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree, timeout=3600)
            sampler.stop.set()
            sampler.join()
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                raise SystemExit(f"{name}, {size} images: the run failed:\n{output.stderr[-3000:]}")
            row = {"tree": name, "images": size, **json.loads(lines[-1][7:])}
            row |= {f"peak_{k}_mb": v / 2**20 for k, v in sampler.peaks.items()}
            row["workers_seen"] = len(sampler.workers)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| tree | images | peak RSS / worker (MiB) | private (RssAnon) | object-store pages (RssShmem) "
        "| object store (MiB) | teacher cache (MiB) | images/s | run (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [row["tree"], row["images"]]
        cells += [f"{row[f'peak_{k}_mb']:.0f}" for k in FIELDS]
        cells += [f"{row['object_store_mb']:.0f}", f"{row['teacher_cache_mb'] or 0:.0f}"]
        cells += [f"{row['images_per_second'][-1]:.0f}", f"{row['total_s']:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="a checkout of the code to compare with (e.g. a git worktree)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--override", action="append", default=[], help="more dotted config overrides")
    parser.add_argument(
        "--also", nargs="+", default=[], help="overrides of a third run of this tree, side by side"
    )
    parser.add_argument("--work", help="where stores and runs go (kept between calls: stores are reused)")
    parser.add_argument("--out", help="JSON lines of the results")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
