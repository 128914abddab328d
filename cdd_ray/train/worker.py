"""The Ray Train per-worker loops: distillation (RD, CDD) and memory banks (PatchCore, SoftPatch).

Distillation, on every worker, each step of the plan (schedule ``alternate`` or ``sequential``):
1. DST: train the domain students this rank owns (domain k on rank k % W) on their domains' data.
2. Exchange: every owner broadcasts its students, so each rank holds all K of them.
3. CDKA: the global student (DDP across ranks) trains on this rank's shard of the whole noisy set.
4. Report losses, images/s and epoch time; every ``checkpoint_every`` steps and at the end, each
   rank adds its files to the checkpoint (rank 0: global student; every rank: its domain students).

Memory banks (``memory_bank_loop``): every rank extracts the patch features of its shard, rank 0
gathers them, builds the bank (SoftPatch: denoised first) and broadcasts it.

Both end the same way when ``eval.score_test`` is on: each rank scores its shard of the test set
with the run's detector, rank 0 gathers the results and writes metrics.json and the overlays, and
the last report carries the metrics with the final checkpoint. The workers already hold the
teacher and the trained model, so no evaluation actor starts.

Each rank reads only its own rows (``cdd_ray.data.sharding``: its shard, its domains, its held-out
ids), streamed from its dataset on every pass and shuffled in a window (``cdd_ray.train.rank_stream``);
images stay uint8 until the step. The frozen teacher's features are cached when they fit
``train.teacher_cache_mb`` per worker (the choice is logged and reported as ``teacher_cache_mb``);
under the ``sequential`` schedule with K > 1, so are the pseudo-normal targets of the rank's shard
when both fit that budget (``target_cache_fits``: the frozen domain students then run in the first
aggregation epoch only; reported as ``target_cache_mb``, the most any rank holds).

``loop_config["trace_dir"]`` (tests and the fixed-cost benchmark) makes each rank log the sample
ids of every batch and a digest of the global student's weights after each epoch.
``loop_config["fault"]`` (tests only, see ``Fault``) makes ranks exit, stall or see NaN images at
chosen batches of chosen steps, each once.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import ray
import torch
import torch.distributed as dist

from cdd_ray.config import Config, config_from_dict, excluded_target_domains
from cdd_ray.data.parquet_rows import ParquetRows
from cdd_ray.data.sharding import rank_dataset_name, rank_rows
from cdd_ray.data.store import split_sample_ids, write_json
from cdd_ray.evaluate.proxy import per_image_loss, trimmed_mean
from cdd_ray.evaluate.scoring import read_split_arrays, score_arrays, write_evaluation
from cdd_ray.models.detector import PatchCoreDetector, distance_statistics, distillation_detector
from cdd_ray.models.distillation.student import Student, student_spec
from cdd_ray.models.patchcore.memory_bank import MemoryBank
from cdd_ray.models.patchcore.model import build_memory_bank
from cdd_ray.models.teacher import build_teacher
from cdd_ray.train.checkpoint import (
    BANK_FILE,
    load_domains,
    load_global,
    save_domains,
    save_global,
    unwrap,
)
from cdd_ray.train.engine import CDDEngine, NonFiniteLossError, TargetCache, stage_plan
from cdd_ray.train.exchange import average_buffers, exchange_domain_students, owned_domains
from cdd_ray.train.fit import training_patch_features
from cdd_ray.train.monitoring import RunGauges
from cdd_ray.train.rank_stream import (
    HOLDOUT,
    SHARD,
    SOURCE_BATCH,
    RankStream,
    batch_count,
    cache_decision,
    target_cache_fits,
)
from cdd_ray.train.session import RayTrainSession

TEST_COLUMNS = ("sample_id", "category", "label", "defect_type", "image", "mask")


def open_stream(config: Config, loop_config: dict, session) -> RankStream:
    """This rank's rows (``cdd_ray.data.sharding``), streamed block by block on every pass: from its
    dataset in the object store, or, for the ranks the driver made none for (``parquet_ranks``,
    ``data.object_store_mb``), from the Parquet store it partitioned."""
    manifest = loop_config["domain_manifest"]
    rows = rank_rows(manifest["assignment"], manifest["num_domains"], session.rank, session.world_size)
    if session.rank in loop_config["parquet_ranks"]:
        source = ParquetRows(
            Path(config.data.path),
            config.data.category,
            config.data.image_size,
            manifest["assignment"],
            rows.ids(),
            loop_config["store_fingerprint"],
        )
    else:
        iterator = session.dataset(rank_dataset_name(session.rank))

        def source(members: frozenset[str]):
            return iterator.iter_batches(batch_size=SOURCE_BATCH, batch_format="numpy", prefetch_batches=1)

    return RankStream(source, rows, session.device, config.data.shuffle_window, SOURCE_BATCH)


def feature_bytes(teacher: torch.nn.Module, image_size: int, device: torch.device) -> int:
    """Bytes of the teacher's features of one image (all levels), measured on a blank image."""
    with torch.no_grad():
        levels = teacher(torch.zeros(1, 3, image_size, image_size, device=device))
    return int(sum(level[0].numel() * level.element_size() for level in levels))


def plan_stages(config: Config) -> list[tuple[int, tuple[str, ...]]]:
    """(epoch, stages) per report, from the run's configuration."""
    if config.method != "distillation":
        return [(0, ("memory_bank",))]
    return stage_plan(config.train.num_domains, config.train.epochs, config.train.schedule)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in unwrap(module).state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _all_reduce(value: float, op: dist.ReduceOp = dist.ReduceOp.SUM) -> float:
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def _gather(values: dict[str, float]) -> dict[str, float]:
    if not _distributed():
        return values
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    return {key: value for part in gathered for key, value in part.items()}


def _gather_to_rank0(value: object) -> list[object] | None:
    """Every rank's ``value`` on rank 0 (in rank order); None on the other ranks."""
    if not _distributed():
        return [value]
    rank = dist.get_rank()
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def _broadcast_from_rank0(value: object) -> object:
    if not _distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class Tracer:
    """Test and benchmark trace of one rank: batches, weight digests and timed events (JSON lines)."""

    def __init__(self, trace_dir: str | None, rank: int):
        self.path = Path(trace_dir) / f"rank{rank}.jsonl" if trace_dir else None
        self.rank = rank

    def __call__(self, **event: object) -> None:
        if self.path is not None:
            with self.path.open("a") as out:
                out.write(json.dumps({"rank": self.rank, **event}) + "\n")

    def mark(self, event: str, step: int = -1) -> None:
        """A timed event (wall clock, seconds) for the fixed-cost benchmark."""
        self(stage="timing", event=event, step=step, t=time.time())


class Fault:
    """Test-only faults. Each spec fires once, at batch ``batch`` of stage ``stage`` ("dst" or
    "global", default "global") of step ``step`` on rank ``rank`` (a marker file records that it
    fired; with ``after``, only once that other marker file exists, i.e. after another fault):

    - ``action: exit``: the worker process exits, what a crashed node or an OOM kill looks like;
    - ``action: stall``: the worker sleeps ``seconds``, so that a test can kill the driver mid-epoch;
    - ``action: nan``: the batch's images become NaN, so the loss check fires as it would in a run.

    ``spec``: one spec (a dict), a list of them, or None.
    """

    def __init__(self, spec: dict | list[dict] | None, rank: int):
        specs = spec if isinstance(spec, list) else [spec] if spec else []
        self.specs = [s for s in specs if s.get("rank", 0) == rank]

    def __call__(self, stage: str, step: int, batch: int, images: torch.Tensor) -> torch.Tensor:
        for spec in self.specs:
            images = self._fire(spec, stage, step, batch, images)
        return images

    @staticmethod
    def _fire(spec: dict, stage: str, step: int, batch: int, images: torch.Tensor) -> torch.Tensor:
        if (stage, step, batch) != (spec.get("stage", "global"), spec["step"], spec["batch"]):
            return images
        marker = Path(spec["marker"])
        if marker.exists() or (spec.get("after") and not Path(spec["after"]).exists()):
            return images
        marker.write_text(f"{stage} step {step} batch {batch}\n")
        action = spec.get("action", "exit")
        if action == "exit":
            os._exit(17)
        if action == "stall":
            time.sleep(float(spec.get("seconds", 60)))
        return torch.full_like(images, float("nan")) if action == "nan" else images


WORKERS_FILE = "workers.json"


def record_workers(run_dir: str | None, rank: int, owned: list[int], device: torch.device) -> None:
    """Rank 0 writes workers.json in the run directory: where each rank ran and what it trained."""
    import socket

    me = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
        "domains": list(owned),
    }
    everyone = [me]
    if _distributed():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
    if rank == 0 and run_dir:
        write_json(Path(run_dir) / WORKERS_FILE, {"workers": everyone})


def make_engine(config: Config, teacher, spec, owned: list[int]) -> CDDEngine:
    """The engine of one rank: its domain students, the global student, the objective's settings."""
    return CDDEngine.create(
        teacher,
        spec,
        config.train.num_domains,
        config.objective,
        config.optim,
        owned,
        config.train.seed,
        excluded_sources=excluded_target_domains(config),
    )


def holdout_proxy(engine: CDDEngine, stream: RankStream, config: Config) -> float:
    """The label-free proxy of the evaluation student over all ranks' held-out shards."""
    losses = []
    for rows in stream.ordered(HOLDOUT):
        losses += per_image_loss(
            engine.teacher,
            engine.evaluation_student(),
            stream.images(rows),
            config.objective.loss_form,
            config.objective.hard_share,
        ).tolist()
    if _distributed():
        gathered: list[list[float]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, losses)
        losses = [value for part in gathered for value in part]
    return trimmed_mean(np.asarray(losses), config.eval.proxy_trim)


@torch.no_grad()
def shard_distance_scale(
    teacher: torch.nn.Module, student: torch.nn.Module, stream: RankStream
) -> torch.Tensor:
    """The ``cos_l2`` scale (L, 2) of the evaluation student over every rank's training rows (each
    rank's shard, summed over ranks). Every rank must call it: it all-reduces."""

    def features_of(rows) -> list[torch.Tensor]:
        cached = stream.features(rows)
        return cached if cached is not None else teacher(stream.images(rows))

    batches = (features_of(rows) for rows in stream.ordered(SHARD))
    statistics = distance_statistics(student, batches, len(teacher.channels), stream.device)
    if _distributed():
        totals = torch.cat([statistics.sums.flatten(), statistics.sums.new_tensor([statistics.images])])
        dist.all_reduce(totals)
        statistics.sums = totals[:-1].view_as(statistics.sums)
        statistics.images = int(totals[-1].item())
    return statistics.scale()


def score_test_shard(
    detector: torch.nn.Module, config: Config, loop_config: dict, session, trace: Tracer
) -> dict:
    """Each rank scores its shard of the test set; rank 0 writes metrics.json and overlays and
    returns the scalar metrics (the other ranks return {})."""
    trace.mark("scoring")
    rank = session.rank
    store = Path(config.data.path)
    mine = split_sample_ids(store, "test", config.data.category)[rank :: session.world_size]
    results = {}
    if mine:
        test = read_split_arrays(store, "test", config.data.category, config.data.image_size, mine)
        results = score_arrays(detector, test, config.ray.eval_batch_size)
    gathered = _gather_to_rank0(results)
    if rank != 0:
        return {}
    parts = [part for part in gathered if part]
    merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]} if parts else {}
    metrics = write_evaluation(Path(loop_config["run_dir"]), config, merged, "final")
    trace.mark("scored")
    return {key: value for key, value in metrics.items() if isinstance(value, float | int)}


def _report(session, metrics: dict, save: Callable[[str], None] | None, trace: Tracer) -> None:
    """Report ``metrics``; with ``save(directory)`` also a checkpoint that every rank adds to."""
    trace.mark("report", int(metrics["step"]) - 1)
    if save is None:
        session.report(metrics, None)
    else:
        with tempfile.TemporaryDirectory() as directory:
            save(directory)
            session.report(metrics, directory)
    trace.mark("reported", int(metrics["step"]) - 1)


def train_loop_per_worker(loop_config: dict) -> None:
    """The TorchTrainer's function: the run's loop in a Ray Train worker."""
    run_loop(loop_config, RayTrainSession())


def run_loop(loop_config: dict, session) -> None:
    """The run's loop in ``session`` (a Ray Train worker, or in-process: ``cdd_ray.train.session``)."""
    config = config_from_dict(loop_config["config"])
    trace = Tracer(loop_config.get("trace_dir"), session.rank)
    trace.mark("loop_start")
    if config.method == "distillation":
        distillation_loop(config, loop_config, session, trace)
    else:
        memory_bank_loop(config, loop_config, session, trace)


def memory_bank_loop(config: Config, loop_config: dict, session, trace: Tracer) -> None:
    """PatchCore / SoftPatch: features extracted data-parallel, the bank built on rank 0."""
    rank, device = session.rank, session.device
    record_workers(loop_config.get("run_dir"), rank, [], device)
    teacher = build_teacher(config.teacher).to(device)
    started = time.perf_counter()
    stream = open_stream(config, loop_config, session)
    trace.mark("data_ready")
    trace.mark("step_start", 0)
    sample_ids: list[str] = []
    parts = []
    with torch.no_grad():
        for rows in stream.ordered(SHARD):
            sample_ids += rows.sample_ids
            parts.append(training_patch_features(teacher, stream.images(rows)).cpu())
    features = torch.cat(parts) if parts else None
    gathered = _gather_to_rank0((sample_ids, features))
    payload = None
    summary: dict = {}
    if rank == 0:
        parts = [(ids, feats) for ids, feats in gathered if ids]
        ids = [sid for part_ids, _ in parts for sid in part_ids]
        order = torch.as_tensor(sorted(range(len(ids)), key=ids.__getitem__))
        everything = torch.cat([feats for _, feats in parts])[order].to(device)
        bank, summary = build_memory_bank(
            everything, config.memory_bank, denoise=config.method == "softpatch", seed=config.train.seed
        )
        payload = (
            bank.features.cpu(),
            None if bank.weights is None else bank.weights.cpu(),
            bank.patch_shape,
        )
    features_, weights, patch_shape = _broadcast_from_rank0(payload)
    bank = MemoryBank(features_, weights, tuple(patch_shape))
    elapsed = time.perf_counter() - started
    images = _all_reduce(len(sample_ids))
    metrics = {
        "epoch": 1,
        "step": 1,
        "stage": "memory_bank",
        "epoch_time_s": elapsed,
        "images_per_second": images / max(elapsed, 1e-9),
        "images_per_second_per_worker": len(sample_ids) / max(elapsed, 1e-9),
        **{f"bank_{key}": value for key, value in summary.items()},
    }
    RunGauges(loop_config.get("run_name", "cdd-ray"), rank).update(metrics)
    trace.mark("step_trained", 0)
    if config.eval.score_test:
        detector = PatchCoreDetector(teacher, bank, config.memory_bank, config.eval.sigma).to(device).eval()
        metrics.update(score_test_shard(detector, config, loop_config, session, trace))

    def save(directory: str) -> None:
        if rank == 0:
            save_global(
                directory, None, None, 1, 1, loop_config["config"], loop_config.get("domain_manifest")
            )
            bank.save(Path(directory) / BANK_FILE)

    _report(session, metrics, save, trace)


def distillation_loop(config: Config, loop_config: dict, session, trace: Tracer) -> None:
    rank, world_size, device = session.rank, session.world_size, session.device
    fault = Fault(loop_config.get("fault"), rank)
    gauges = RunGauges(loop_config.get("run_name", "cdd-ray"), rank)
    num_domains = config.train.num_domains

    # 1. Models: seed-determined, so every rank builds the same initial students.
    teacher = build_teacher(config.teacher).to(device)
    spec = student_spec(teacher.channels, teacher.reductions, config.teacher.backbone, config.student)
    owned = owned_domains(num_domains, rank, world_size)
    record_workers(loop_config.get("run_dir"), rank, owned, device)
    engine = make_engine(config, teacher, spec, owned)  # students and EMA on the teacher's device

    # 2. Resume from the last checkpoint of a run with the same name.
    done = 0
    selection: dict | None = None  # eval.select=proxy: the best aggregation epoch so far
    with session.last_checkpoint() as directory:
        if directory is not None:
            state = load_global(Path(directory))
            engine.global_student.load_state_dict(state["global_student"])
            engine.global_optimizer.load_state_dict(state["global_optimizer"])
            if engine.global_ema is not None and state.get("global_ema"):
                engine.global_ema.load_state_dict(state["global_ema"])
            if state.get("selection"):
                selection = {**state["selection"], "state": state["evaluation_student"]}
            students, optimizers = load_domains(Path(directory))
            for k in owned:
                engine.domain_students[k].load_state_dict(students[k])
                engine.domain_optimizers[k].load_state_dict(optimizers[k])
            done = state["steps_done"]
    engine.global_student = session.prepare_model(engine.global_student)

    # 3. Data: this rank's own rows, streamed on every pass; the teacher's features cached if they fit.
    stream = open_stream(config, loop_config, session)
    use_cache, cache_mb = cache_decision(
        config.train.teacher_cache,
        stream.training_rows(),
        feature_bytes(teacher, config.data.image_size, device),
        config.train.teacher_cache_mb,
        rank,
        config.objective.augment,
    )
    if use_cache and done < len(plan_stages(config)):  # nothing left to train: no cache to fill
        stream.fill_cache(engine.teacher_features)
        sequential = num_domains > 1 and config.train.schedule == "sequential"
        if sequential:
            shard = stream.positions(SHARD)  # the rows the aggregation steps read
            targets_mb = cache_mb * len(shard) / max(1, stream.training_rows())
            if target_cache_fits(cache_mb, targets_mb, config.train.teacher_cache_mb, rank):
                engine.target_cache = TargetCache(stream.training_rows(), shard)
    cache_mb = _all_reduce(cache_mb, dist.ReduceOp.MAX)
    # The same answer on every rank (the proxy gathers over all of them), even one without held-out rows.
    holdout = stream if config.data.holdout_fraction and loop_config["domain_manifest"]["holdout"] else None
    trace.mark("data_ready")
    replicas: dict = {}
    stages = plan_stages(config)
    epochs = config.train.epochs
    for step, (epoch, stage_names) in enumerate(stages[done:], start=done):
        # Shuffling (and the students' input augmentation, when on) seeded per (seed, rank, step): a
        # resumed run draws what an uninterrupted one would, and ranks draw differently.
        step_seed = config.train.seed * 1_000_003 + rank * 10_007 + step
        generator = torch.Generator().manual_seed(step_seed)
        engine.reseed_augmentation(step_seed)
        trace.mark("step_start", step)
        started = time.perf_counter()
        metrics: dict[str, float] = {"epoch": epoch + 1, "step": step + 1}
        images_seen = 0
        try:
            if "dst" in stage_names:
                if engine.target_cache is not None:  # on every rank: any rank's students may change
                    engine.target_cache.clear()
                losses = {}
                for k in owned:
                    count, values = batch_count(stream.size(k), config.train.batch_size), []
                    for batch, rows in enumerate(stream.shuffled(k, config.train.batch_size, generator)):
                        trace(step=step, stage="dst", domain=k, sample_ids=rows.sample_ids)
                        images = fault("dst", step, batch, stream.images(rows))
                        progress = (epoch + batch / count) / epochs
                        values.append(engine.domain_step(k, images, stream.features(rows), progress))
                        images_seen += len(rows)
                    losses[f"loss_domain_{k}"] = float(np.mean(values)) if values else float("nan")
                metrics.update(_gather(losses))
            if "global" in stage_names:
                students = None
                if num_domains > 1:
                    students = exchange_domain_students(
                        engine.domain_students, spec, num_domains, replicas, device
                    )
                count = batch_count(stream.size(SHARD), config.train.batch_size)
                steps = int(_all_reduce(count, dist.ReduceOp.MIN))  # DDP needs equal step counts
                values = []
                plan = stream.shuffled(SHARD, config.train.batch_size, generator)
                for batch, rows in enumerate(itertools.islice(plan, steps)):
                    trace(step=step, stage="global", domain=-1, sample_ids=rows.sample_ids)
                    values.append(
                        engine.global_step(
                            fault("global", step, batch, stream.images(rows)),
                            rows.domains.to(device),
                            students,
                            stream.features(rows),
                            progress=(epoch + batch / max(steps, 1)) / epochs,
                            positions=rows.positions,
                        )
                    )
                    images_seen += len(rows)
                average_buffers(unwrap(engine.global_student))
                if engine.global_ema is not None:
                    average_buffers(engine.global_ema)
                metrics["loss_global"] = _all_reduce(float(np.mean(values)) if values else 0.0) / world_size
                trace(step=step, stage="digest", global_digest=_digest(engine.global_student))
                if holdout is not None:
                    metrics["proxy_loss"] = holdout_proxy(engine, holdout, config)
                    better = selection is None or metrics["proxy_loss"] < selection["proxy_loss"]
                    if config.eval.select == "proxy" and better:
                        state_dict = copy.deepcopy(engine.evaluation_student().state_dict())
                        selection = {
                            "epoch": epoch + 1,
                            "proxy_loss": metrics["proxy_loss"],
                            "state": state_dict,
                        }
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"epoch {epoch + 1}: {error}") from error
        elapsed = time.perf_counter() - started
        metrics["epoch_time_s"] = elapsed
        metrics["images_per_second_per_worker"] = images_seen / elapsed
        metrics["images_per_second"] = _all_reduce(images_seen) / elapsed
        metrics["stage"] = "+".join(stage_names)
        metrics["teacher_cache_mb"] = cache_mb
        held = engine.target_cache.megabytes() if engine.target_cache is not None else 0.0
        metrics["target_cache_mb"] = _all_reduce(held, dist.ReduceOp.MAX)
        gauges.update(metrics)
        trace.mark("step_trained", step)
        last = step + 1 == len(stages)
        if last:
            engine.target_cache = None  # free it before scoring
        scale = None
        scorer = _evaluation_student(engine, spec, selection, device) if last else None
        if last and config.eval.distance == "cos_l2":
            scale = shard_distance_scale(teacher, scorer, stream)  # the checkpoint keeps it
        if last and config.eval.score_test:
            if selection is not None:
                metrics["selected_epoch"] = selection["epoch"]
            detector = distillation_detector(teacher, scorer, config.eval, scale).eval()
            metrics.update(score_test_shard(detector, config, loop_config, session, trace))
        checkpoint_now = (step + 1) % config.train.checkpoint_every == 0 or last
        save = None
        if checkpoint_now:
            save = _distillation_saver(engine, selection, rank, epoch + 1, step + 1, loop_config, scale)
        _report(session, metrics, save, trace)


def _evaluation_student(
    engine: CDDEngine, spec, selection: dict | None, device: torch.device
) -> torch.nn.Module:
    """The weights that scoring uses: the proxy's choice, else the EMA, else the global student."""
    if selection is None:
        return engine.evaluation_student()
    student = Student(spec).to(device)
    student.load_state_dict(selection["state"])
    return student


def _distillation_saver(
    engine: CDDEngine,
    selection: dict | None,
    rank: int,
    epoch: int,
    steps: int,
    loop_config: dict,
    scale: torch.Tensor | None = None,
):
    """A function that writes this rank's part of the checkpoint of the step just done (with the
    ``cos_l2`` distance scale at the run's last step)."""
    evaluation_state = _evaluation_state(engine, selection)
    evaluation_state["distance_scale"] = None if scale is None else scale.tolist()

    def save(directory: str) -> None:
        if rank == 0:
            save_global(
                directory,
                engine.global_student,
                engine.global_optimizer,
                epoch,
                steps,
                loop_config["config"],
                loop_config.get("domain_manifest"),
                extra={
                    "global_ema": None if engine.global_ema is None else engine.global_ema.state_dict(),
                    **evaluation_state,
                },
            )
        save_domains(directory, rank, engine.domain_students, engine.domain_optimizers)

    return save


def _evaluation_state(engine: CDDEngine, selection: dict | None) -> dict:
    """Checkpoint entries for the weights that scoring uses (None: the global student itself)."""
    if selection is not None:
        chosen = {"epoch": selection["epoch"], "proxy_loss": selection["proxy_loss"]}
        return {"evaluation_student": selection["state"], "selection": chosen}
    if engine.global_ema is not None:
        return {"evaluation_student": engine.global_ema.module.state_dict(), "selection": None}
    return {"evaluation_student": None, "selection": None}
