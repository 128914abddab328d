import pytest
import torch

from cdd_ray.models.distillation.losses import ObjectiveConfig
from cdd_ray.models.distillation.student import student_spec
from cdd_ray.train.engine import (
    CDDEngine,
    NonFiniteLossError,
    OptimConfig,
    TargetCache,
    batches,
    ema_decay_at,
    fit_in_process,
    lr_at,
)
from tests.models.test_teacher import random_teacher


def make_engine(num_domains: int = 2, optim: OptimConfig | None = None, **objective):
    teacher = random_teacher()
    spec = student_spec(teacher.channels, teacher.reductions)
    return CDDEngine.create(
        teacher, spec, num_domains, ObjectiveConfig(**objective), optim or OptimConfig(), seed=3
    )


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_in_process_training_is_deterministic():
    images = torch.rand(12, 3, 32, 32)
    domains = torch.tensor([0, 1, 2] * 4)
    runs = []
    for _ in range(2):
        engine = make_engine(3, gating=True)
        history = fit_in_process(engine, images, domains, epochs=2, batch_size=4, seed=1)
        runs.append((history, weights(engine.global_student)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, runs[1][1][k]) for k, a in runs[0][1].items())


def test_students_and_their_average_live_on_the_teachers_device():
    """On a GPU the engine's students must follow the teacher (the EMA too, or its update mixes
    devices); the meta device stands in for one here."""
    teacher = random_teacher().to("meta")
    spec = student_spec(teacher.channels, teacher.reductions)
    engine = CDDEngine.create(teacher, spec, 2, ObjectiveConfig(), OptimConfig(ema_decay=0.99), seed=3)
    students = [engine.global_student, engine.global_ema, *engine.domain_students.values()]
    tensors = [t for s in students for t in [*s.parameters(), *s.buffers()]]
    assert {t.device.type for t in tensors if t.is_floating_point()} == {"meta"}


def test_dst_step_touches_only_its_own_student_and_global_step_only_the_global_one():
    engine = make_engine(2)
    images = torch.rand(4, 3, 32, 32)
    before = {k: weights(s) for k, s in engine.domain_students.items()}
    global_before = weights(engine.global_student)
    engine.domain_step(1, images)
    assert all(torch.equal(v, before[0][k]) for k, v in engine.domain_students[0].state_dict().items())
    assert any(not torch.equal(v, before[1][k]) for k, v in engine.domain_students[1].state_dict().items())
    assert all(torch.equal(v, global_before[k]) for k, v in engine.global_student.state_dict().items())
    after_dst = {k: weights(s) for k, s in engine.domain_students.items()}
    engine.global_step(images, torch.tensor([0, 1, 0, 1]))
    for domain, student in engine.domain_students.items():
        assert all(torch.equal(v, after_dst[domain][k]) for k, v in student.state_dict().items())


def test_step_hook_sees_domain_batches_only_from_their_domain():
    engine = make_engine(2)
    domains = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])
    seen = []
    fit_in_process(
        engine,
        torch.rand(8, 3, 32, 32),
        domains,
        epochs=1,
        batch_size=2,
        on_step=lambda stage, k, index: seen.append((stage, k, index.tolist())),
    )
    for stage, k, index in seen:
        if stage == "dst":
            assert all(int(domains[i]) == k for i in index)
    assert sorted(i for stage, _, index in seen if stage == "global" for i in index) == list(range(8))


def test_teacher_cache_gives_the_same_training():
    images, domains = torch.rand(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    cached, plain = make_engine(2), make_engine(2)
    fit_in_process(cached, images, domains, epochs=1, batch_size=4, teacher_cache=True)
    fit_in_process(plain, images, domains, epochs=1, batch_size=4, teacher_cache=False)
    for key, value in cached.global_student.state_dict().items():
        assert torch.allclose(value, plain.global_student.state_dict()[key], atol=1e-6)


def _domain_student_calls(engine) -> list[int]:
    """Domain ids of the domain students' forward passes in eval mode (the pseudo-normal targets;
    their own DST steps run in train mode)."""
    calls = []
    for k, student in engine.domain_students.items():
        student.register_forward_hook(
            lambda module, args, out, k=k: None if module.training else calls.append(k)
        )
    return calls


def test_target_cache_runs_the_domain_students_once_and_trains_the_same():
    # 12 images in batches of 4: every aggregation batch has the same size, so the cached targets
    # are the very numbers the domain students give at every step (TargetCache's docstring)
    images, domains = torch.rand(12, 3, 32, 32), torch.tensor([0, 1] * 6)
    runs = {}
    for name in ("cached", "computed"):
        engine = make_engine(2)
        calls = _domain_student_calls(engine)
        fit_in_process(
            engine,
            images,
            domains,
            epochs=3,
            batch_size=4,
            teacher_cache=True,
            schedule="sequential",
            cache_targets=name == "cached",
        )
        # target passes of the domain students over 3 aggregation epochs of 3 batches, K = 2
        runs[name] = (len(calls), weights(engine.evaluation_student()), engine.target_cache)
    assert runs["cached"][0] == 3 * 2  # the first aggregation epoch only
    assert runs["computed"][0] == 3 * 3 * 2  # every aggregation epoch
    for key, value in runs["cached"][1].items():
        assert torch.equal(value, runs["computed"][1][key]), key
    assert runs["cached"][2] is None  # released after training


def test_target_cache_is_off_when_the_domain_students_keep_training():
    images, domains = torch.rand(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    engine = make_engine(2)
    engine.target_cache = TargetCache(8)  # one left on the engine from elsewhere is not used either
    seen = []
    fit_in_process(
        engine,
        images,
        domains,
        epochs=2,
        batch_size=4,
        teacher_cache=True,
        schedule="alternate",
        on_step=lambda stage, k, index: seen.append(engine.target_cache),
    )
    assert len(seen) == 8 and all(cache is None for cache in seen)


def test_a_failed_fit_leaves_no_target_cache_behind():
    images, domains = torch.rand(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    images[5, 0, 0, 0] = float("nan")
    engine = make_engine(2)
    with pytest.raises(NonFiniteLossError):
        fit_in_process(engine, images, domains, 1, 4, teacher_cache=True, schedule="sequential")
    assert engine.target_cache is None


def test_target_cache_hits_only_filled_rows_and_a_domain_step_clears_it():
    cache = TargetCache(6)
    targets = [torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2)]
    assert cache.get(torch.tensor([1, 4])) is None
    cache.put(torch.tensor([1, 4]), targets)
    got = cache.get(torch.tensor([4, 1]))
    assert torch.equal(got[0], targets[0].flip(0)) and torch.equal(got[1], targets[1].flip(0))
    assert cache.get(torch.tensor([1, 2])) is None  # row 2 was never filled
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        cache.put(torch.tensor([6, 0]), targets)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        cache.get(torch.tensor([-1, 1]))  # a held-out row's position (-1) never reads the last row
    engine = make_engine(2)
    engine.target_cache = cache
    engine.domain_step(0, torch.rand(4, 3, 32, 32))
    assert cache.get(torch.tensor([1, 4])) is None


def test_a_target_cache_of_some_rows_holds_only_those():
    cache = TargetCache(6, cached=torch.tensor([4, 1]))
    assert cache.size == 2
    targets = [torch.rand(3, 3, 4, 4), torch.rand(3, 5, 2, 2)]
    cache.put(torch.tensor([1, 2, 4]), targets)  # row 2 is not one it holds: not kept
    assert cache.store[0].shape == (2, 3, 4, 4)  # room for the two rows only
    got = cache.get(torch.tensor([4, 1]))
    assert torch.equal(got[0], targets[0][[2, 0]]) and torch.equal(got[1], targets[1][[2, 0]])
    assert cache.get(torch.tensor([1, 2])) is None
    cache.put(torch.tensor([2]), [t[:1] for t in targets])  # nothing it holds: no-op
    assert cache.get(torch.tensor([2])) is None
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        TargetCache(6, cached=torch.tensor([0, 6]))


def test_non_finite_loss_names_the_stage_and_domain():
    engine = make_engine(2)
    images = torch.rand(4, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="DST of domain 1"):
        engine.domain_step(1, images)


def test_batches_never_leave_a_single_sample():
    sizes = [len(b) for b in batches(torch.arange(9), 4, torch.Generator().manual_seed(0))]
    assert sizes == [4, 5] and all(s > 1 for s in sizes)


def test_in_process_fit_refuses_an_empty_training_set_and_mismatched_domain_ids():
    engine = make_engine(2)
    with pytest.raises(ValueError, match="no training images"):
        fit_in_process(engine, torch.rand(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), 1, batch_size=4)
    with pytest.raises(ValueError, match="4 images but 3 domain ids"):
        fit_in_process(engine, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0]), 1, batch_size=4)


def test_learning_rate_warms_up_then_follows_a_half_cosine():
    optim = OptimConfig(lr=0.01, lr_schedule="cosine", warmup=0.2, min_lr_ratio=0.1)
    assert lr_at(optim, 0.0) == 0.0
    assert lr_at(optim, 0.1) == pytest.approx(0.005)
    assert lr_at(optim, 0.2) == pytest.approx(0.01)
    assert lr_at(optim, 0.6) == pytest.approx(0.001 + 0.5 * 0.009)  # halfway through the decay
    assert lr_at(optim, 1.0) == pytest.approx(0.001)
    assert lr_at(OptimConfig(lr=0.01, lr_schedule="constant", warmup=0.0), 0.7) == 0.01


def test_the_optimizer_steps_with_the_scheduled_learning_rate():
    engine = make_engine(1, optim=OptimConfig(lr=0.01, lr_schedule="cosine", warmup=0.0, min_lr_ratio=0.0))
    engine.global_step(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), progress=0.5)
    assert engine.global_optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_gradient_clipping_bounds_the_gradient_norm():
    engine = make_engine(1, optim=OptimConfig(clip_grad_norm=1e-3))
    engine.global_step(torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    grads = [p.grad for p in engine.global_student.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1e-3 * (1 + 1e-4)


def test_ema_student_is_the_exponential_average_of_the_trained_weights():
    engine = make_engine(1, optim=OptimConfig(ema_decay=0.99))
    assert engine.evaluation_student() is not engine.global_student
    images, domains = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    engine.global_step(images, domains)
    first = weights(engine.global_student)  # the first update copies the weights
    engine.global_step(images, domains)
    second = weights(engine.global_student)
    decay = ema_decay_at(0.99, 1)  # warm-up: the second update still weighs the new weights heavily
    assert decay == pytest.approx(2 / 11)
    for key, value in engine.evaluation_student().state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, decay * first[key] + (1 - decay) * second[key], atol=1e-6), key
    assert weights(make_engine(1).evaluation_student()).keys() == first.keys()
    assert ema_decay_at(0.99, 10_000) == 0.99


def test_selection_keeps_the_best_epoch_weights():
    engine = make_engine(1)
    scores = iter([3.0, 1.0, 2.0])
    kept = {}

    def select_on(student):
        score = next(scores)
        kept[score] = weights(student)
        return score

    history = fit_in_process(
        engine, torch.rand(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), 3, 4, select_on=select_on
    )
    assert [h["selection_score"] for h in history] == [3.0, 1.0, 2.0]
    final = weights(engine.evaluation_student())
    assert all(torch.equal(final[k], kept[1.0][k]) for k in final)
