"""The Ray Train per-worker loop of one CDD run (schedule ``alternate`` or ``sequential``).

Steps on every worker, each epoch:
1. DST: train the domain students this rank owns (domain k on rank k % W) on their domains' data.
2. Exchange: every owner broadcasts its students, so each rank holds all K of them.
3. CDKA: the global student (DDP across ranks) trains on this rank's shard of the whole noisy set.
4. Report losses, images/s and epoch time; every ``checkpoint_every`` epochs and at the end, each
   rank adds its files to the checkpoint (rank 0: global student; every rank: its domain students).

Schedule ``sequential`` runs every DST epoch first, then every aggregation epoch. The rank's data
stays in memory (per-category datasets are small), which also lets the frozen teacher's features be
cached (``train.teacher_cache``).

``loop_config["trace_dir"]`` (tests only) makes each rank log the sample ids of every batch and a
digest of the global student's weights after each epoch. ``loop_config["fault"]`` (tests only, see
``Fault``) makes one rank exit, stall or see NaN images at a chosen batch of a chosen step, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cdd_ray.config import Config, config_from_dict, excluded_target_domains
from cdd_ray.data.store import write_json
from cdd_ray.evaluate.proxy import per_image_loss, trimmed_mean
from cdd_ray.models.student import student_spec
from cdd_ray.models.teacher import build_teacher
from cdd_ray.train.checkpoint import load_domains, load_global, save_domains, save_global, unwrap
from cdd_ray.train.engine import CDDEngine, NonFiniteLossError, batches, stage_plan
from cdd_ray.train.exchange import average_buffers, exchange_domain_students, owned_domains
from cdd_ray.train.monitoring import RunGauges


class RankData:
    """Images in memory, sorted by sample id, with their ids, domains and cached teacher features.

    With ``shard=(rank, world_size)`` the rank keeps every world_size-th image of the sorted set: the
    shard depends only on the data, never on which Ray Data block reached which worker first, so a
    restarted or repeated run trains on exactly the same batches."""

    def __init__(
        self,
        iterator: ray.data.DataIterator | None,
        device: torch.device,
        shard: tuple[int, int] | None = None,
    ):
        rows = list(iterator.iter_batches(batch_size=256, batch_format="numpy")) if iterator else []
        rows = [r for r in rows if len(r["sample_id"])]
        ids = [str(sid) for r in rows for sid in r["sample_id"]]
        order = sorted(range(len(ids)), key=ids.__getitem__)
        if shard is not None:
            order = order[shard[0] :: shard[1]]
        self.sample_ids = [ids[i] for i in order]
        if order:
            keep = torch.as_tensor(order)
            self.images = torch.from_numpy(np.concatenate([r["image"] for r in rows]))[keep]
            self.domains = torch.from_numpy(np.concatenate([r["domain"] for r in rows]))[keep]
        else:
            self.images, self.domains = torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.int64)
        self.device = device
        self.cache: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def features(self, engine: CDDEngine, index: torch.Tensor, use_cache: bool) -> list[torch.Tensor] | None:
        if not use_cache:
            return None
        if self.cache is None:
            chunks = [
                engine.teacher_features(self.images[i : i + 64].to(self.device))
                for i in range(0, len(self), 64)
            ]
            self.cache = [torch.cat([c[level] for c in chunks]) for level in range(len(chunks[0]))]
        return [level[index.to(self.device)] for level in self.cache]


def plan_stages(config: Config) -> list[tuple[int, tuple[str, ...]]]:
    """(epoch, stages) per report, from the run's configuration."""
    return stage_plan(config.train.num_domains, config.train.epochs, config.train.schedule)


def _digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in unwrap(module).state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _all_reduce(value: float, op: dist.ReduceOp = dist.ReduceOp.SUM) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def _gather(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    return {key: value for part in gathered for key, value in part.items()}


class Tracer:
    def __init__(self, trace_dir: str | None, rank: int):
        self.path = Path(trace_dir) / f"rank{rank}.jsonl" if trace_dir else None
        self.rank = rank

    def __call__(self, **event: object) -> None:
        if self.path is not None:
            with self.path.open("a") as out:
                out.write(json.dumps({"rank": self.rank, **event}) + "\n")


class Fault:
    """A test-only fault at batch ``batch`` of stage ``stage`` ("dst" or "global") of step ``step``
    on rank ``rank``, fired once (a marker file records that it fired):

    - ``action: exit``: the worker process exits, what a crashed node or an OOM kill looks like;
    - ``action: stall``: the worker sleeps ``seconds``, so that a test can kill the driver mid-epoch;
    - ``action: nan``: the batch's images become NaN, so the loss check fires as it would in a run.
    """

    def __init__(self, spec: dict | None, rank: int):
        self.spec = spec if spec and spec.get("rank", 0) == rank else None

    def __call__(self, stage: str, step: int, batch: int, images: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec is None or (stage, step, batch) != (spec.get("stage", "global"), spec["step"], spec["batch"]):
            return images
        marker = Path(spec["marker"])
        if marker.exists():
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
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
        "domains": list(owned),
    }
    everyone = [me]
    if dist.is_available() and dist.is_initialized():
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


def holdout_proxy(engine: CDDEngine, holdout: RankData, config: Config) -> float:
    """The label-free proxy over all ranks' held-out shards (see cdd_ray.evaluate.proxy)."""
    losses = []
    for start in range(0, len(holdout), 64):
        images = holdout.images[start : start + 64].to(holdout.device)
        losses += per_image_loss(
            engine.teacher, unwrap(engine.global_student), images, config.objective.loss_form
        ).tolist()
    if dist.is_available() and dist.is_initialized():
        gathered: list[list[float]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, losses)
        losses = [value for part in gathered for value in part]
    return trimmed_mean(np.asarray(losses), config.eval.proxy_trim)


def train_loop_per_worker(loop_config: dict) -> None:
    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    trace = Tracer(loop_config.get("trace_dir"), rank)
    fault = Fault(loop_config.get("fault"), rank)
    gauges = RunGauges(loop_config.get("run_name", "cdd-ray"), rank)
    num_domains = config.train.num_domains

    # 1. Models: seed-determined, so every rank builds the same initial students.
    teacher = build_teacher(config.teacher).to(device)
    spec = student_spec(teacher.channels, teacher.reductions, config.teacher.backbone)
    owned = owned_domains(num_domains, rank, world_size)
    record_workers(loop_config.get("run_dir"), rank, owned, device)
    engine = make_engine(config, teacher, spec, owned)
    engine.global_student.to(device)
    for student in engine.domain_students.values():
        student.to(device)

    # 2. Resume from the last checkpoint of a run with the same name.
    done = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_global(Path(directory))
            engine.global_student.load_state_dict(state["global_student"])
            engine.global_optimizer.load_state_dict(state["global_optimizer"])
            students, optimizers = load_domains(Path(directory))
            for k in owned:
                engine.domain_students[k].load_state_dict(students[k])
                engine.domain_optimizers[k].load_state_dict(optimizers[k])
            done = state["steps_done"]
    engine.global_student = ray.train.torch.prepare_model(engine.global_student)

    # 3. Data: this rank's shard of the whole set, and the full data of each domain it owns.
    shard = RankData(ray.train.get_dataset_shard("train"), device, (rank, world_size))
    domain_data = {k: RankData(ray.train.get_dataset_shard(f"domain_{k}"), device) for k in owned}
    holdout = (
        RankData(ray.train.get_dataset_shard("holdout"), device, (rank, world_size))
        if config.data.holdout_fraction
        else None
    )
    use_cache = config.train.teacher_cache
    replicas: dict = {}
    stages = plan_stages(config)
    for step, (epoch, stage_names) in enumerate(stages[done:], start=done):
        # Shuffling seeded per (seed, rank, step): a resumed run draws what an uninterrupted one would.
        generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + rank * 10_007 + step)
        started = time.perf_counter()
        metrics: dict[str, float] = {"epoch": epoch + 1, "step": step + 1}
        images_seen = 0
        try:
            if "dst" in stage_names:
                losses = {}
                for k in owned:
                    data, values = domain_data[k], []
                    plan = batches(torch.arange(len(data)), config.train.batch_size, generator)
                    for batch, index in enumerate(plan):
                        trace(
                            step=step, stage="dst", domain=k, sample_ids=[data.sample_ids[i] for i in index]
                        )
                        images = fault("dst", step, batch, data.images[index].to(device))
                        values.append(engine.domain_step(k, images, data.features(engine, index, use_cache)))
                        images_seen += len(index)
                    losses[f"loss_domain_{k}"] = float(np.mean(values)) if values else float("nan")
                metrics.update(_gather(losses))
            if "global" in stage_names:
                students = None
                if num_domains > 1:
                    students = exchange_domain_students(
                        engine.domain_students, spec, num_domains, replicas, device
                    )
                plan = batches(torch.arange(len(shard)), config.train.batch_size, generator)
                steps = int(_all_reduce(len(plan), dist.ReduceOp.MIN))  # DDP needs equal step counts
                values = []
                for batch, index in enumerate(plan[:steps]):
                    trace(
                        step=step, stage="global", domain=-1, sample_ids=[shard.sample_ids[i] for i in index]
                    )
                    values.append(
                        engine.global_step(
                            fault("global", step, batch, shard.images[index].to(device)),
                            shard.domains[index].to(device),
                            students,
                            shard.features(engine, index, use_cache),
                        )
                    )
                    images_seen += len(index)
                average_buffers(unwrap(engine.global_student))
                metrics["loss_global"] = _all_reduce(float(np.mean(values)) if values else 0.0) / world_size
                trace(step=step, stage="digest", global_digest=_digest(engine.global_student))
                if holdout is not None:
                    metrics["proxy_loss"] = holdout_proxy(engine, holdout, config)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"epoch {epoch + 1}: {error}") from error
        elapsed = time.perf_counter() - started
        metrics["epoch_time_s"] = elapsed
        metrics["images_per_second_per_worker"] = images_seen / elapsed
        metrics["images_per_second"] = _all_reduce(images_seen) / elapsed
        metrics["stage"] = "+".join(stage_names)
        gauges.update(metrics)
        last = step + 1 == len(stages)
        if (step + 1) % config.train.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as directory:
                if rank == 0:
                    save_global(
                        directory,
                        engine.global_student,
                        engine.global_optimizer,
                        epoch + 1,
                        step + 1,
                        loop_config["config"],
                        loop_config.get("domain_manifest"),
                    )
                save_domains(directory, rank, engine.domain_students, engine.domain_optimizers)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
