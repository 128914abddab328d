"""Plain-PyTorch CDD training: domain-specific steps, aggregation steps, and an in-process fit.

No Ray here. The Ray per-worker loop calls ``CDDEngine.domain_step`` and ``CDDEngine.global_step``
batch by batch; ``fit_in_process`` runs the same steps on in-memory tensors on one process, which is
what tests, benchmarks and debugging use.

One epoch (schedule ``alternate``):
1. DST: for every domain k, student S_k trains on domain k's images against the teacher.
2. CDKA: the global student trains on all images against the pseudo-normal targets of the other
   domains' students (frozen, eval mode) and the teacher.
With K = 1 there are no domain students and the global step is exactly RD.

Example::

    engine = CDDEngine.create(teacher, spec, num_domains=2, objective=ObjectiveConfig(), optim=OptimConfig())
    history = fit_in_process(engine, images, domains, epochs=3, batch_size=8, seed=0)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from cdd_ray.models.distillation.losses import (
    ObjectiveConfig,
    cut_paste,
    disagreement,
    global_student_loss,
    jitter_features,
    pseudo_normal_targets,
    random_dihedral,
    rd_loss,
)
from cdd_ray.models.distillation.student import Student, StudentSpec
from cdd_ray.models.teacher import Teacher
from cdd_ray.train.checkpoint import unwrap

Features = list[torch.Tensor]


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class OptimConfig:
    """Adam as RD4AD sets it (lr 0.005, betas 0.5 / 0.999). The schedule, clipping and EMA defaults
    come from the recipe study on the photo benchmark (BENCHMARKS.md "Stable training: the recipe
    study"): together they lifted RD from 0.846 to 0.880 image AUROC on clean data and its worst run
    from 0.50 to 0.73."""

    lr: float = 0.005
    beta1: float = 0.5
    beta2: float = 0.999
    lr_schedule: str = "cosine"  # or "constant"; cosine decays to lr * min_lr_ratio over a student's epochs
    warmup: float = 0.1  # share of a student's epochs with a linear warm-up from 0
    min_lr_ratio: float = 0.01
    clip_grad_norm: float = 1.0  # max global gradient norm per step; 0: no clipping
    # per-step decay (with warm-up) of an EMA of the global student, scored instead; 0: off
    ema_decay: float = 0.99


def make_optimizer(module: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2))


def lr_at(optim: OptimConfig, progress: float) -> float:
    """Learning rate after ``progress`` (0..1) of a student's training: linear warm-up over the first
    ``warmup`` share, then constant or a half-cosine from ``lr`` to ``lr * min_lr_ratio``
    (SGDR, Loshchilov & Hutter 2017, without restarts)."""
    if optim.warmup > 0 and progress < optim.warmup:
        return optim.lr * progress / optim.warmup
    if optim.lr_schedule == "constant":
        return optim.lr
    span = max(1.0 - optim.warmup, 1e-12)
    done = min(max((progress - optim.warmup) / span, 0.0), 1.0)
    floor = optim.lr * optim.min_lr_ratio
    return floor + 0.5 * (optim.lr - floor) * (1.0 + math.cos(math.pi * done))


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of the ``updates``-th EMA update: ``min(decay, (1 + n) / (10 + n))``, the warm-up of
    TensorFlow's ExponentialMovingAverage (its ``num_updates`` argument), so that a short run's
    average is not dominated by its first, untrained weights (0.99 over 100 steps would still give
    the initial weights a third of the average)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def make_ema(module: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``module``'s parameters and buffers (BatchNorm statistics
    too), updated after each optimizer step with the warm-up of ``ema_decay_at``; None when
    ``decay`` is 0."""
    if decay <= 0:
        return None

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        weight = 1.0 - ema_decay_at(decay, int(updates))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers (BatchNorm's batch counters), as torch's own EMA treats them
            for average, value in zip(averaged, current, strict=True):
                average.copy_(average * (1.0 - weight) + value * weight)

    return AveragedModel(module, multi_avg_fn=update, use_buffers=True)


def seeded_student(spec: StudentSpec, seed: int) -> Student:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Student(spec)


class NonFiniteLossError(FloatingPointError):
    """A loss turned NaN or infinite; says where."""


def _checked(loss: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss.item()} in {where}")
    return loss


class TargetCache:
    """The pseudo-normal targets of a process's training rows, kept once computed.

    Valid while the domain students stay frozen: under the ``sequential`` schedule every DST epoch
    runs before the first aggregation epoch, so the first aggregation epoch fills the cache and the
    later ones read it instead of running the K domain students again (one forward pass each per
    step saved). A row's targets are those of the batch it was first computed in; the same
    computation in another batch of the same size gives the same numbers on CPU (a batch of another
    size may differ in the last bits). Memory: as much as the teacher-feature cache of the rows it
    may hold.

    ``rows``: how many rows the positions index (positions lie in [0, rows)); ``cached`` (N,): the
    positions it may hold (None: all ``rows``; a Ray worker passes its shard's, the rows its
    aggregation steps read, not those of the domains it owns). Rows outside ``cached`` are never
    hits and are not kept.
    """

    def __init__(self, rows: int, cached: torch.Tensor | None = None):
        self.rows = rows
        if cached is None:
            self.slot = torch.arange(rows)  # position -> its row in the store (-1: not held)
        else:
            cached = cached.cpu().unique()
            self._check(cached)
            self.slot = torch.full((rows,), -1, dtype=torch.int64)
            self.slot[cached] = torch.arange(len(cached))
        self.size = rows if cached is None else len(cached)
        self.store: Features | None = None
        self.filled = torch.zeros(self.size, dtype=torch.bool)

    def get(self, positions: torch.Tensor) -> Features | None:
        """Targets of the rows at ``positions`` (B,), or None unless every one of them is filled."""
        slots = self._slots(positions)
        if self.store is None or bool((slots < 0).any()) or not bool(self.filled[slots].all()):
            return None
        index = slots.to(self.store[0].device)
        return [level[index] for level in self.store]

    def put(self, positions: torch.Tensor, targets: Features) -> None:
        """Keep ``targets`` (per level (B, C, H, W)) for the rows at ``positions`` (B,) it may hold."""
        slots = self._slots(positions)
        kept = slots >= 0
        if not bool(kept.any()):
            return
        if self.store is None:
            self.store = [level.new_empty((self.size, *level.shape[1:])) for level in targets]
        every = bool(kept.all())  # a worker's aggregation batches: its shard's rows only
        index = (slots if every else slots[kept]).to(self.store[0].device)
        rows = None if every else kept.to(targets[0].device)
        for store, level in zip(self.store, targets, strict=True):
            store[index] = level if rows is None else level[rows]
        self.filled[slots[kept]] = True

    def clear(self) -> None:
        self.store = None
        self.filled.zero_()

    def megabytes(self) -> float:
        """MiB the targets take now (0 before the first ``put`` and after ``clear``)."""
        if self.store is None:
            return 0.0
        return sum(level.numel() * level.element_size() for level in self.store) / 2**20

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        self._check(positions)
        return self.slot[positions.cpu()]

    def _check(self, positions: torch.Tensor) -> None:
        if len(positions) and (int(positions.min()) < 0 or int(positions.max()) >= self.rows):
            raise ValueError(f"target cache positions must lie in [0, {self.rows})")


class CDDEngine:
    """Holds the teacher, the global student and the domain students this process trains."""

    def __init__(
        self,
        teacher: Teacher,
        global_student: nn.Module,
        domain_students: dict[int, Student],
        num_domains: int,
        objective: ObjectiveConfig,
        optim: OptimConfig,
        excluded_sources: Sequence[int] = (),
        seed: int = 0,
    ):
        self.teacher = teacher
        self.global_student = global_student
        self.domain_students = domain_students
        self.num_domains = num_domains
        self.objective = objective
        self.excluded_sources = tuple(excluded_sources)  # domains whose students give no targets
        self.optim = optim
        self.global_optimizer = make_optimizer(global_student, optim)
        self.domain_optimizers = {k: make_optimizer(s, optim) for k, s in domain_students.items()}
        self.global_ema = make_ema(unwrap(global_student), optim.ema_decay)
        self.gate_thresholds: list[float] | None = None  # the relative gate's running quantiles
        # Set by the training loops under the sequential schedule only (``TargetCache``): a DST step
        # clears it, but only on this process, and other ranks' students may train (alternate).
        self.target_cache: TargetCache | None = None
        self._augmentation_seed = seed + 104729
        self._augmentation_generator: torch.Generator | None = None

    @classmethod
    def create(
        cls,
        teacher: Teacher,
        spec: StudentSpec,
        num_domains: int,
        objective: ObjectiveConfig,
        optim: OptimConfig,
        owned_domains: Sequence[int] | None = None,
        seed: int = 0,
        excluded_sources: Sequence[int] = (),
    ) -> CDDEngine:
        """Each student's initial weights depend only on (seed, its domain), not on the process or
        the device; the students (and the EMA) live on the teacher's device."""
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        device = next(teacher.parameters()).device
        global_student = seeded_student(spec, seed).to(device)
        owned = range(num_domains) if owned_domains is None else owned_domains
        domain_students = (
            {k: seeded_student(spec, seed + 1 + k).to(device) for k in owned} if num_domains > 1 else {}
        )
        return cls(
            teacher, global_student, domain_students, num_domains, objective, optim, excluded_sources, seed
        )

    @property
    def uses_domains(self) -> bool:
        return self.num_domains > 1

    def teacher_features(self, images: torch.Tensor) -> Features:
        return self.teacher(images)

    def reseed_augmentation(self, seed: int) -> None:
        """Restart the augmentation stream from ``seed``. The loops call it at every planned step with
        a seed of (run seed, rank, step), as they seed the shuffling, so that ranks draw different
        patches and noise and a resumed run draws what an uninterrupted one would."""
        self._augmentation_seed = seed
        self._augmentation_generator = None

    @property
    def augmentation_generator(self) -> torch.Generator:
        """The random stream of the geometric augmentation, the synthetic anomalies and the feature
        jitter, on the teacher's device; made at first use after (re)seeding (a generator cannot
        live on every device a teacher may, e.g. the meta device, so none is made while the knobs
        are off)."""
        if self._augmentation_generator is None:
            device = next(self.teacher.parameters()).device
            self._augmentation_generator = torch.Generator(device).manual_seed(self._augmentation_seed)
        return self._augmentation_generator

    def training_pair(self, images: torch.Tensor, feats: Features | None) -> tuple[torch.Tensor, Features]:
        """The images a step trains on and the teacher's features of them: with
        ``objective.augment`` other than ``none``, each image transformed by a random symmetry
        (``random_dihedral``) and its features taken afresh (one more teacher pass per step, the
        cache cannot hold them); otherwise ``feats`` (the cached features) or the teacher's."""
        if self.objective.augment != "none":
            images = random_dihedral(images, self.objective.augment, self.augmentation_generator)
            with torch.no_grad():
                return images, self.teacher_features(images)
        return images, feats if feats is not None else self.teacher_features(images)

    def student_input(self, feats: Features, images: torch.Tensor) -> Features:
        """What a student in training is fed: the teacher's features of ``images``, those of images
        with pasted patches when ``objective.synthetic_anomalies`` > 0 (``cut_paste``), jittered when
        ``objective.feature_jitter`` > 0 (``jitter_features``); losses compare with the clean ones."""
        if self.objective.synthetic_anomalies > 0:
            pasted = cut_paste(images, self.objective.synthetic_anomalies, self.augmentation_generator)
            with torch.no_grad():
                feats = self.teacher_features(pasted)
        if self.objective.feature_jitter == 0:
            return feats
        return jitter_features(feats, self.objective.feature_jitter, self.augmentation_generator)

    def _update(
        self, loss: torch.Tensor, module: nn.Module, optimizer: torch.optim.Optimizer, progress: float
    ):
        """Backward, then one optimizer step at the scheduled learning rate, with clipping if set."""
        for group in optimizer.param_groups:
            group["lr"] = lr_at(self.optim, progress)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.optim.clip_grad_norm)
        optimizer.step()

    def domain_step(
        self,
        domain: int,
        images: torch.Tensor,
        teacher_feats: Features | None = None,
        progress: float = 0.0,
    ) -> float:
        """One DST step: S_domain against the teacher on images of that domain only. ``progress``
        (0..1): how far this student's training has come, for the learning-rate schedule."""
        student = self.domain_students[domain]
        student.train()
        if self.target_cache is not None:  # targets computed before this step are stale
            self.target_cache.clear()
        images, feats = self.training_pair(images, teacher_feats)
        output = student(self.student_input(feats, images))
        loss = rd_loss(output, feats, self.objective.loss_form, hard_share=self.objective.hard_share)
        _checked(loss, f"DST of domain {domain}")
        self._update(loss, student, self.domain_optimizers[domain], progress)
        return float(loss.detach())

    @torch.no_grad()
    def pseudo_normal(
        self, feats: Features, domain_ids: torch.Tensor, all_domain_students: Sequence[nn.Module]
    ) -> Features:
        outputs = []
        for student in all_domain_students:
            student.eval()
            outputs.append(student(feats))
        return pseudo_normal_targets(outputs, domain_ids, self.objective.aggregation, self.excluded_sources)

    def global_step(
        self,
        images: torch.Tensor,
        domain_ids: torch.Tensor,
        all_domain_students: Sequence[nn.Module] | None = None,
        teacher_feats: Features | None = None,
        progress: float = 0.0,
        positions: torch.Tensor | None = None,
    ) -> float:
        """One aggregation step of the global student (plain RD when K = 1), then the EMA update.
        ``positions`` (B,): the rows' indices in ``target_cache``, which then gives (or keeps) the
        pseudo-normal targets."""
        images, feats = self.training_pair(images, teacher_feats)
        targets = None
        if self.uses_domains:
            cache = self.target_cache if positions is not None else None
            targets = cache.get(positions) if cache is not None else None
            if targets is None:
                students = all_domain_students
                if students is None:
                    students = self.all_domain_students()
                targets = self.pseudo_normal(feats, domain_ids, students)
                if cache is not None:
                    cache.put(positions, targets)
        gate = self.relative_gate(targets, feats) if targets is not None else None
        self.global_student.train()
        output = self.global_student(self.student_input(feats, images))
        loss = global_student_loss(output, feats, targets, self.objective, teacher_weights=gate)
        _checked(loss, "aggregation (global student)")
        self._update(loss, self.global_student, self.global_optimizer, progress)
        if self.global_ema is not None:
            self.global_ema.update_parameters(unwrap(self.global_student))
        return float(loss.detach())

    @torch.no_grad()
    def relative_gate(self, targets: Features, feats: Features) -> list[torch.Tensor] | None:
        """With ``objective.gate_quantile`` = q > 0: per level, weight 0 at the positions whose
        disagreement 1 - cos(P, T) is above a running (1 - q)-quantile of it (an exponential
        average, momentum 0.9, of each batch's quantile), 1 elsewhere. Each rank keeps its own
        running quantiles; a resumed run starts them afresh."""
        share = self.objective.gate_quantile
        if share <= 0:
            return None
        levels = disagreement(targets, feats)
        quantiles = [float(torch.quantile(d.flatten().float(), 1.0 - share)) for d in levels]
        if self.gate_thresholds is None:
            self.gate_thresholds = quantiles
        else:
            self.gate_thresholds = [
                0.9 * old + 0.1 * new for old, new in zip(self.gate_thresholds, quantiles, strict=True)
            ]
        return [
            (d <= limit).to(d.dtype).unsqueeze(1)
            for d, limit in zip(levels, self.gate_thresholds, strict=True)
        ]

    def evaluation_student(self) -> nn.Module:
        """What scoring, prediction and the proxy use: the EMA of the global student when enabled."""
        return self.global_ema.module if self.global_ema is not None else unwrap(self.global_student)

    def all_domain_students(self) -> list[nn.Module]:
        missing = sorted(set(range(self.num_domains)) - set(self.domain_students))
        if missing:
            raise RuntimeError(f"this process does not hold domain students {missing}")
        return [self.domain_students[k] for k in range(self.num_domains)]


def batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled batches; a trailing batch of one joins the previous one (BatchNorm needs two)."""
    shuffled = indices[torch.randperm(len(indices), generator=generator)]
    chunks = [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


StepHook = Callable[[str, int, torch.Tensor], None]


Plan = list[tuple[int, tuple[str, ...]]]


def stage_plan(num_domains: int, epochs: int, schedule: str = "alternate") -> Plan:
    """(epoch, stages) in training order: both stages each epoch (``alternate``), or all DST epochs
    and then all aggregation epochs (``sequential``). K = 1 has only the global (RD) stage."""
    if schedule not in ("alternate", "sequential"):
        raise ValueError(f"schedule must be 'alternate' or 'sequential', got {schedule!r}")
    if num_domains == 1:
        return [(e, ("global",)) for e in range(epochs)]
    if schedule == "alternate":
        return [(e, ("dst", "global")) for e in range(epochs)]
    return [(e, ("dst",)) for e in range(epochs)] + [(e, ("global",)) for e in range(epochs)]


def fit_in_process(
    engine: CDDEngine,
    images: torch.Tensor,
    domains: torch.Tensor,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    teacher_cache: bool = False,
    on_step: StepHook | None = None,
    schedule: str = "alternate",
    select_on: Callable[[nn.Module], float] | None = None,
    cache_targets: bool = True,
) -> list[dict[str, float]]:
    """Run the stages of ``stage_plan`` on in-memory images; returns the losses of each planned step.

    ``images`` (N, 3, S, S) lie on the engine's device; ``domains`` (N,) and the batch plan stay on
    the CPU (each batch's domain ids are moved to the images' device).

    ``teacher_cache``: the teacher's features of ``images`` computed once (not with
    ``objective.augment``); with it, ``cache_targets``, K > 1 and the ``sequential`` schedule, the
    pseudo-normal targets are computed once too (``TargetCache``, filled by the first aggregation
    epoch; ``cache_targets=False`` runs the domain students at every step, for comparison).

    ``on_step(stage, domain, sample_indices)`` sees every batch, for tests and tracing.
    ``select_on(student) -> float`` (lower is better, e.g. the held-out proxy) is called with the
    evaluation student after every aggregation epoch; the best epoch's weights are loaded back into
    it at the end (label-free checkpoint choice).
    """
    if len(images) == 0:
        raise ValueError("fit_in_process got no training images")
    if len(domains) != len(images):
        raise ValueError(f"{len(images)} images but {len(domains)} domain ids")
    generator = torch.Generator().manual_seed(seed)
    # no cache when every step transforms its images (objective.augment): no step could read it
    cached = engine.teacher_features(images) if teacher_cache and engine.objective.augment == "none" else None
    use_targets = cache_targets and cached is not None and engine.uses_domains and schedule == "sequential"
    engine.target_cache = TargetCache(len(images)) if use_targets else None  # never one left from before

    def feats_of(index: torch.Tensor) -> Features | None:
        return None if cached is None else [f[index] for f in cached]

    history = []
    best: tuple[float, dict] | None = None
    all_indices = torch.arange(len(images))
    try:
        for step, (epoch, stages) in enumerate(stage_plan(engine.num_domains, epochs, schedule)):
            engine.reseed_augmentation(seed * 1_000_003 + step)  # as the Ray loop's rank 0 does
            record: dict[str, float] = {}
            if "dst" in stages:
                for k in sorted(engine.domain_students):
                    losses = []
                    plan = batches(all_indices[domains == k], batch_size, generator)
                    for batch, index in enumerate(plan):
                        if on_step:
                            on_step("dst", k, index)
                        progress = (epoch + batch / len(plan)) / epochs
                        losses.append(engine.domain_step(k, images[index], feats_of(index), progress))
                    record[f"loss_domain_{k}"] = sum(losses) / max(1, len(losses))
            if "global" in stages:
                losses = []
                plan = batches(all_indices, batch_size, generator)
                for batch, index in enumerate(plan):
                    if on_step:
                        on_step("global", -1, index)
                    progress = (epoch + batch / len(plan)) / epochs
                    losses.append(
                        engine.global_step(
                            images[index],
                            domains[index].to(images.device),
                            teacher_feats=feats_of(index),
                            progress=progress,
                            positions=index,
                        )
                    )
                record["loss_global"] = sum(losses) / len(losses)
                if select_on is not None:
                    record["selection_score"] = select_on(engine.evaluation_student())
                    if best is None or record["selection_score"] < best[0]:
                        best = (
                            record["selection_score"],
                            copy.deepcopy(engine.evaluation_student().state_dict()),
                        )
            history.append(record)
    finally:
        engine.target_cache = None  # of no use after training, nor to another fit
    if best is not None:
        engine.evaluation_student().load_state_dict(best[1])
    return history
