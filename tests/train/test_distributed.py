"""Ray Train runs on 2 CPU workers: domain isolation, rank agreement, checkpoints, resume."""

import json
import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from cdd_ray.config import load_config
from cdd_ray.data.domains import HOLDOUT
from cdd_ray.data.sharding import rank_rows
from cdd_ray.evaluate.scoring import load_detector, read_split_arrays
from cdd_ray.models.detector import distance_scale
from cdd_ray.train.checkpoint import load_domains, load_global
from cdd_ray.train.run import DOMAINS_FILE, evaluate, latest_checkpoint, train
from tests.conftest import count_target_passes, read_progress, tiny_overrides


def read_trace(trace_dir: Path) -> list[dict]:
    """Batches and digests (the timed events are for the fixed-cost benchmark)."""
    events = []
    for path in sorted(trace_dir.glob("rank*.jsonl")):
        events += [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in events if e["stage"] != "timing"]


def check_domain_isolation(events: list[dict], assignment: dict[str, int]) -> None:
    dst = [e for e in events if e["stage"] == "dst"]
    assert dst, "no DST batches were traced"
    seen = defaultdict(set)
    for event in dst:
        for sid in event["sample_ids"]:
            assert assignment[sid] == event["domain"], (
                f"{sid} of domain {assignment[sid]} trained student {event['domain']}"
            )
            seen[event["domain"]].add(sid)
    for domain, ids in seen.items():
        assert ids == {sid for sid, k in assignment.items() if k == domain}, f"domain {domain} missed samples"


def check_ranks_agree(events: list[dict], world_size: int) -> None:
    digests = defaultdict(dict)
    for event in events:
        if event["stage"] == "digest":
            digests[event["step"]][event["rank"]] = event["global_digest"]
    assert digests, "no digests were traced"
    for step, by_rank in digests.items():
        assert len(by_rank) == world_size and len(set(by_rank.values())) == 1, (
            f"ranks disagree after step {step}"
        )


def train_traced(config, tmp_path: Path, label: str):
    trace = tmp_path / f"trace-{label}"
    trace.mkdir()
    run_dir, checkpoint, metrics = train(config, trace_dir=str(trace))
    return run_dir, checkpoint, metrics, read_trace(trace)


def check_run(
    config, run_dir: Path, checkpoint: Path, metrics: dict, events: list[dict], world_size: int = 2
) -> None:
    num_domains = config.train.num_domains
    manifest = json.loads((run_dir / DOMAINS_FILE).read_text())
    assert sorted(set(manifest["assignment"].values())) == list(range(num_domains))
    check_domain_isolation(events, manifest["assignment"])
    check_ranks_agree(events, world_size=world_size)
    # In each step the ranks' global shards together cover the training set once (DDP may drop a tail).
    global_steps = {e["step"] for e in events if e["stage"] == "global"}
    assert global_steps, "no global step was traced"
    for step in global_steps:
        ids = [sid for e in events if e["stage"] == "global" and e["step"] == step for sid in e["sample_ids"]]
        assert len(ids) == len(set(ids)) <= len(manifest["assignment"]), f"step {step}"
        assert len(ids) >= len(manifest["assignment"]) - 2 * config.train.batch_size, f"step {step}"
    reported = {key for report in read_progress(run_dir) for key in report}
    assert {f"loss_domain_{k}" for k in range(num_domains)} | {"loss_global", "images_per_second"} <= reported
    assert metrics["epoch"] == config.train.epochs
    # The checkpoint holds the global student and every domain student; it round-trips.
    state = load_global(checkpoint)
    assert state["config"]["train"]["num_domains"] == num_domains
    students, optimizers = load_domains(checkpoint)
    assert sorted(students) == sorted(optimizers) == list(range(num_domains))
    assert state["domain_manifest"]["assignment"] == manifest["assignment"]
    assert torch.isfinite(next(iter(state["global_student"].values()))).all()


class TrainLog(logging.Handler):
    """The messages of the ``cdd_ray.train`` logger at INFO and above, while in a ``with``
    (attached to that logger itself: a run lowers the level of the root's handlers, caplog's too)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.messages)

    def __enter__(self) -> "TrainLog":
        logger = logging.getLogger("cdd_ray.train")
        self._level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger("cdd_ray.train")
        logger.removeHandler(self)
        logger.setLevel(self._level)


def test_sequential_k2_domain_isolation_in_process(ray_session, tiny_store, tmp_path, monkeypatch):
    """In-process (ray.num_workers=0, the same loop on one rank): the sequential plan, domain
    isolation and the pseudo-normal target cache; rank agreement under DDP is the two-worker
    test's below."""
    overrides = {
        "train.num_domains": 2,
        "train.schedule": "sequential",
        "train.epochs": 2,
        "name": "seq",
        "ray.num_workers": 0,
    }
    config = load_config(None, tiny_overrides(tiny_store, tmp_path / "runs", **overrides))
    target_passes = count_target_passes(monkeypatch)  # the run is in this process
    with TrainLog() as log:
        run_dir, checkpoint, metrics, events = train_traced(config, tmp_path, "seq")
    check_run(config, run_dir, checkpoint, metrics, events, world_size=1)
    stages = {e["step"]: e["stage"] for e in events if e["stage"] in ("dst", "global")}
    assert stages == {0: "dst", 1: "dst", 2: "global", 3: "global"}, "sequential: all DST epochs first"
    state = load_global(checkpoint)
    assert state["epoch"] == 2 and state["steps_done"] == 4
    assert "pseudo-normal target cache on" in log.text
    reports = read_progress(run_dir)
    # one rank: its shard is every row, so the targets take what the teacher's features take
    assert reports[-1]["target_cache_mb"] == pytest.approx(reports[-1]["teacher_cache_mb"], rel=1e-6)
    assert all(r["target_cache_mb"] == 0 for r in reports if r["stage"] == "dst")
    cached_passes = len(target_passes)
    target_passes.clear()
    # A budget with room for the teacher's features but not for the targets too: the domain
    # students run at every aggregation step, and the run trains (almost) the same student (a
    # batch of another size may compute a row's targets in other last bits: TargetCache)
    features_mb = float(read_progress(run_dir)[-1]["teacher_cache_mb"])
    tight = load_config(
        None,
        tiny_overrides(
            tiny_store,
            tmp_path / "runs",
            **{**overrides, "name": "seq-tight", "train.teacher_cache_mb": 1.5 * features_mb},
        ),
    )
    with TrainLog() as log:
        _, tight_checkpoint, _ = train(tight)
    assert "teacher-feature cache on" in log.text and "target cache off" in log.text
    # with the cache, the first of the two aggregation epochs computed every batch's targets
    assert cached_passes > 0 and len(target_passes) == 2 * cached_passes
    cached, computed = state["evaluation_student"], load_global(tight_checkpoint)["evaluation_student"]
    for name, tensor in cached.items():
        if torch.is_floating_point(tensor):
            assert torch.allclose(tensor, computed[name], atol=1e-5), name


def test_sequential_k2_on_two_workers_keeps_each_ranks_shard_targets(ray_session, tiny_store, tmp_path):
    """The shipped schedule under DDP on two workers: domains isolated, ranks agreeing after every
    step, and each rank's target cache holding its shard's rows only, fewer than its feature cache
    (shard and the domain it trains: rank r trains domain r)."""
    overrides = {
        "train.num_domains": 2,
        "train.schedule": "sequential",
        "train.epochs": 2,
        "name": "seq2",
        "eval.score_test": "false",
    }
    config = load_config(None, tiny_overrides(tiny_store, tmp_path / "runs", **overrides))
    run_dir, checkpoint, metrics, events = train_traced(config, tmp_path, "seq2")
    check_run(config, run_dir, checkpoint, metrics, events, world_size=2)
    reports = read_progress(run_dir)
    assert [r["stage"] for r in reports] == ["dst", "dst", "global", "global"]
    # each cache as the rank's rows give it (every row the same bytes; the reports carry the ranks' most)
    assignment = json.loads((run_dir / DOMAINS_FILE).read_text())["assignment"]
    ranks = [rank_rows(assignment, 2, rank, 2) for rank in range(2)]
    shard = max(len(rows.shard) for rows in ranks)
    held = max(len(set(rows.shard).union(*rows.domains.values())) for rows in ranks)
    assert shard < held
    expected = reports[-1]["teacher_cache_mb"] * shard / held
    assert reports[-1]["target_cache_mb"] == pytest.approx(expected, rel=1e-9)


def test_training_batches_carry_no_labels(ray_session, tiny_store):
    from cdd_ray.data.ray_data import read_split

    batch = read_split(tiny_store, "train", "weave", 32).take_batch(4)
    assert set(batch) == {"sample_id", "image"}
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["image"].dtype == np.uint8  # a quarter of float32; to_float at the step


def test_a_block_without_wanted_rows_keeps_the_images_a_tensor_column(ray_session, tiny_store):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from cdd_ray.data.batches import decode_block
    from cdd_ray.data.ray_data import TRAIN_READ_COLUMNS
    from cdd_ray.data.store import SAMPLES_FILE

    table = pq.read_table(tiny_store / SAMPLES_FILE, columns=TRAIN_READ_COLUMNS)
    wanted = pc.and_(pc.equal(table["split"], "train"), pc.equal(table["category"], "weave"))
    blocks = [table.filter(pc.invert(wanted)), table.filter(wanted)]  # the first holds no wanted row
    assert blocks[0].num_rows > 0 and blocks[1].num_rows > 0
    kwargs = {"split": "train", "category": "weave", "image_size": 32, "evaluation": False}
    dataset = ray.data.from_arrow(blocks).map_batches(decode_block, batch_format="pyarrow", fn_kwargs=kwargs)
    dataset = dataset.materialize()
    assert "tensor" in str(dataset.schema().types[dataset.schema().names.index("image")]).lower()
    assert dataset.count() == blocks[1].num_rows


def test_each_rank_dataset_holds_only_that_ranks_rows_once_in_file_order(ray_session, tiny_store, tmp_path):
    import pyarrow.parquet as pq

    from cdd_ray.data.sharding import rank_dataset_name, rank_rows
    from cdd_ray.data.store import SAMPLES_FILE
    from cdd_ray.train.run import data_path_lines, partition_training_set, rank_datasets

    overrides = {"train.num_domains": 3, "data.holdout_fraction": 0.2}
    config = load_config(None, tiny_overrides(tiny_store, tmp_path / "runs", **overrides))
    manifest = partition_training_set(config, tiny_store)
    datasets, parquet_ranks = rank_datasets(config, tiny_store, manifest)
    assert parquet_ranks == {}
    assert set(datasets) == {rank_dataset_name(0), rank_dataset_name(1)}
    table = pq.read_table(tiny_store / SAMPLES_FILE, columns=["sample_id", "category", "split"])
    rows_in_file = table.to_pylist()
    file_order = [r["sample_id"] for r in rows_in_file if (r["category"], r["split"]) == ("weave", "train")]
    stored = 0
    for rank in (0, 1):
        rows = rank_rows(manifest["assignment"], 3, rank, 2)
        batch = datasets[rank_dataset_name(rank)].take_batch(1000)
        ids = [str(sid) for sid in batch["sample_id"]]
        assert ids == [sid for sid in file_order if sid in rows.ids()]  # each once, in the file's order
        assert batch["domain"].tolist() == [manifest["assignment"][sid] for sid in ids]
        assert batch["image"].dtype == np.uint8
        stored += len(ids)
    assert stored < 2 * len(manifest["assignment"])  # at most two copies whatever K
    assert data_path_lines(config, tiny_store, parquet_ranks) == []

    # over data.object_store_mb the driver materializes nothing; each worker reads the Parquet store
    over = load_config(
        None, tiny_overrides(tiny_store, tmp_path / "runs", **overrides, **{"data.object_store_mb": 0})
    )
    skipped, parquet_ranks = rank_datasets(over, tiny_store, manifest)
    assert skipped == {}
    assert parquet_ranks == {r: len(rank_rows(manifest["assignment"], 3, r, 2).ids()) for r in (0, 1)}
    lines = data_path_lines(over, tiny_store, parquet_ranks)
    assert len(lines) == 2 and all(
        "data.object_store_mb=0" in line and SAMPLES_FILE in line for line in lines
    )


def test_k3_round_robin_on_two_workers_then_evaluate_and_predict(two_worker_run, tmp_path):
    config, run_dir, checkpoint, metrics, trace = two_worker_run
    events = read_trace(trace)
    check_run(config, run_dir, checkpoint, metrics, events)
    assert {e["rank"] for e in events if e["stage"] == "dst" and e["domain"] == 2} == {0}  # 2 mod 2 workers
    assert load_global(checkpoint)["epoch"] == 2
    assert latest_checkpoint(run_dir) == checkpoint
    reports = read_progress(run_dir)
    assert [r["epoch"] for r in reports] == [1, 2]

    # the workers scored the test set; `cdd-ray evaluate` of the same checkpoint agrees
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["checkpoint"] == str(checkpoint) and metrics["image_auroc"] == written["image_auroc"]
    # With the workers' one torch thread (0.5 CPU each): with two, the convolutions sum in another
    # order, and the last-bit differences in the maps reorder near-tied pixels, moving AUPRO by ~1e-4.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))  # what Ray gives a 0.5-CPU worker
    try:
        again = evaluate(config, run_dir, checkpoint)
    finally:
        torch.set_num_threads(threads)
    assert set(again["per_category"]) == {"weave"}
    assert 0.0 <= again["image_auroc"] <= 1.0 and 0.0 <= again["aupro"] <= 1.0
    # the same scores; AUPRO's float sums may differ in the last bit (other summation order)
    assert again["image_auroc"] == written["image_auroc"]
    assert again["aupro"] == pytest.approx(written["aupro"], rel=1e-9)
    assert len(list((run_dir / "overlays").glob("*.png"))) == 2

    # the cos_l2 scale is the mean over both ranks' shards (all-reduced), as one process computes it
    detector, _ = load_detector(checkpoint, torch.device("cpu"))
    assignment = json.loads((run_dir / DOMAINS_FILE).read_text())["assignment"]
    trained = sorted(sid for sid, domain in assignment.items() if domain != HOLDOUT)
    images = read_split_arrays(Path(config.data.path), "train", "weave", 32, trained)["image"]
    assert len(images) == len(trained) > 2 * config.train.batch_size
    expected = distance_scale(detector.teacher, detector.student, torch.from_numpy(images))
    assert torch.allclose(detector.distance_scale, expected, rtol=1e-4)

    # cdd-ray predict on new image files, from the same checkpoint.
    from PIL import Image

    from cdd_ray.evaluate.predict import predict_images

    paths = []
    for index in range(2):
        paths.append(tmp_path / f"new{index}.png")
        Image.fromarray(np.full((40, 40, 3), 60 * (index + 1), dtype=np.uint8)).save(paths[-1])
    rows = predict_images(run_dir, checkpoint, paths, tmp_path / "predictions")
    assert [Path(r["image"]).name for r in rows] == ["new0.png", "new1.png"]
    assert all(np.isfinite(r["score"]) and Path(r["map"]).is_file() for r in rows)
    assert json.loads((tmp_path / "predictions" / "predictions.json").read_text())["images"] == rows
    assert all(isinstance(r["anomalous"], bool) and Path(r["mask"]).is_file() for r in rows)
