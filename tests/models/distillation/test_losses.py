import pytest
import torch

from cdd_ray.models.distillation.losses import (
    ObjectiveConfig,
    agreement_gate,
    cut_paste,
    global_student_loss,
    jitter_features,
    pseudo_normal_targets,
    random_dihedral,
    rd_loss,
)
from cdd_ray.models.distillation.student import student_spec
from cdd_ray.train.engine import CDDEngine, OptimConfig, batches, fit_in_process, seeded_student
from tests.models.test_teacher import random_teacher


def feats(batch: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=generator) for c, s in ((4, 8), (6, 4), (8, 2))]


@pytest.mark.parametrize("form", ["flat", "pixel", "hard"])
def test_rd_loss_is_zero_for_identical_features_and_positive_otherwise(form):
    target = feats()
    assert rd_loss(target, target, form).abs() < 1e-6
    assert rd_loss(feats(seed=1), target, form) > 0.5


def test_flat_and_pixel_forms_differ():
    # One position flipped: the pixel form sees a full mismatch there, the flat form barely notices.
    target = [torch.ones(1, 3, 4, 4)]
    student = [target[0].clone()]
    student[0][:, :, 0, 0] = -1.0
    flat, pixel = rd_loss(student, target, "flat"), rd_loss(student, target, "pixel")
    assert pixel == pytest.approx(2.0 / 16)
    assert flat == pytest.approx(1 - 14 / 16)


def test_hard_form_averages_only_the_worst_share_of_each_images_positions():
    # image 0: one position flipped (distance 2) and three at distance 1 - cos = 1 (orthogonal);
    # image 1: one orthogonal position; the other positions of both match (distance 0)
    target = [torch.zeros(2, 2, 4, 4)]
    target[0][:, 0] = 1.0
    student = [target[0].clone()]
    student[0][0, 0, 0, 0] = -1.0
    for y, x in ((1, 1), (2, 2), (3, 3)):
        student[0][0, :, y, x] = torch.tensor([0.0, 1.0])
    student[0][1, :, 0, 0] = torch.tensor([0.0, 1.0])
    hard = rd_loss(student, target, "hard", reduction="none", hard_share=2 / 16)  # the worst 2 of 16
    assert hard.tolist() == pytest.approx([(2.0 + 1.0) / 2, (1.0 + 0.0) / 2])
    # the whole share is the pixel form; any share keeps at least one position
    everything = rd_loss(student, target, "hard", reduction="none", hard_share=1.0)
    assert everything.tolist() == pytest.approx(rd_loss(student, target, "pixel", reduction="none").tolist())
    worst_only = rd_loss(student, target, "hard", reduction="none", hard_share=1e-6)
    assert worst_only.tolist() == pytest.approx([2, 1])
    # a weight multiplies the distances before the worst are taken: a weight of 0 fences a position off
    gate = [torch.ones(2, 1, 4, 4)]
    gate[0][0, 0, 0, 0] = 0.0
    gated = rd_loss(student, target, "hard", weights=gate, reduction="none", hard_share=2 / 16)
    assert gated.tolist() == pytest.approx([1.0, 0.5])


def test_rd_loss_per_image_reduction():
    target = feats()
    per_image = rd_loss(feats(seed=2), target, reduction="none")
    assert per_image.shape == (3,)
    assert per_image.mean() == pytest.approx(float(rd_loss(feats(seed=2), target)))


def constant_outputs(num_domains: int, batch: int) -> list[list[torch.Tensor]]:
    """Student j outputs the constant j + 1 everywhere, so targets reveal which students were used."""
    return [[torch.full((batch, 2, 3, 3), float(j + 1))] for j in range(num_domains)]


def test_pseudo_normal_target_never_uses_the_samples_own_domain():
    domain_ids = torch.tensor([0, 1, 2, 3, 2])
    outputs = constant_outputs(4, len(domain_ids))
    (mean,) = pseudo_normal_targets(outputs, domain_ids, "mean")
    total = sum(range(1, 5))
    for b, k in enumerate(domain_ids.tolist()):
        assert torch.allclose(mean[b], torch.full_like(mean[b], (total - (k + 1)) / 3))
    (median,) = pseudo_normal_targets(outputs, domain_ids, "median")
    others = {0: [2, 3, 4], 1: [1, 3, 4], 2: [1, 2, 4], 3: [1, 2, 3]}
    for b, k in enumerate(domain_ids.tolist()):
        assert torch.allclose(median[b], torch.full_like(median[b], float(sorted(others[k])[1])))


def test_pseudo_normal_with_two_domains_is_the_other_student():
    outputs = constant_outputs(2, 2)
    (target,) = pseudo_normal_targets(outputs, torch.tensor([0, 1]), "mean")
    assert target[0].unique().tolist() == [2.0] and target[1].unique().tolist() == [1.0]


def test_excluded_sources_never_give_targets():
    domain_ids = torch.tensor([0, 1, 2, 0])
    (target,) = pseudo_normal_targets(constant_outputs(3, 4), domain_ids, "mean", excluded_sources=(0,))
    # domain 0 (excluded) learns from students 1 and 2; domains 1 and 2 only from each other
    expected = [(2 + 3) / 2, 3.0, 2.0, (2 + 3) / 2]
    assert [t.unique().tolist() for t in target] == [[e] for e in expected]
    with pytest.raises(ValueError, match="no other domain's student"):
        pseudo_normal_targets(constant_outputs(2, 2), torch.tensor([0, 1]), excluded_sources=(0,))
    with pytest.raises(ValueError, match="must lie in"):
        pseudo_normal_targets(constant_outputs(3, 2), torch.tensor([0, 1]), excluded_sources=(3,))


def test_pseudo_normal_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least two"):
        pseudo_normal_targets(constant_outputs(1, 2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="domain ids"):
        pseudo_normal_targets(constant_outputs(2, 2), torch.tensor([0, 2]))


def test_global_loss_without_domains_is_rd_whatever_the_weights():
    teacher, student = feats(), feats(seed=3)
    for weights in ({"lambda_teacher": 0.7}, {"lambda_teacher": 2.0, "lambda_cross": 0.0}, {}):
        loss = global_student_loss(student, teacher, None, ObjectiveConfig(**weights))
        assert float(loss) == float(rd_loss(student, teacher))


def test_global_loss_is_the_weighted_mean_of_its_two_terms():
    teacher, student, pseudo = feats(), feats(seed=3), feats(seed=4)
    to_teacher, to_pseudo = float(rd_loss(student, teacher)), float(rd_loss(student, pseudo))
    for cross, teach in ((1.0, 2.0), (0.5, 0.5), (0.0, 1.0), (3.0, 0.0)):
        objective = ObjectiveConfig(lambda_cross=cross, lambda_teacher=teach)
        expected = (cross * to_pseudo + teach * to_teacher) / (cross + teach)
        assert float(global_student_loss(student, teacher, pseudo, objective)) == pytest.approx(
            expected, rel=1e-6
        )


def test_global_loss_is_zero_when_student_matches_both_targets():
    teacher = feats()
    objective = ObjectiveConfig(gating=True)
    assert global_student_loss(teacher, teacher, teacher, objective).abs() < 1e-6


def test_gate_fences_off_positions_where_other_domains_disagree_with_the_teacher():
    teacher = [torch.ones(1, 4, 4, 4)]
    pseudo = [teacher[0].clone()]
    pseudo[0][:, :, 1, 1] = -1.0  # the other domains cannot reproduce the teacher here
    (gate,) = agreement_gate(pseudo, teacher, temperature=0.1)
    assert gate[0, 0, 0, 0] == pytest.approx(1.0) and gate[0, 0, 1, 1] < 1e-6
    objective = ObjectiveConfig(lambda_cross=0.0, gating=True, loss_form="pixel")
    student = [teacher[0].clone()]
    student[0][:, :, 1, 1] = -1.0  # the global student reproduces the suspicious position badly
    assert global_student_loss(student, teacher, pseudo, objective) < 1e-5
    ungated = ObjectiveConfig(lambda_cross=0.0, gating=False, loss_form="pixel")
    assert global_student_loss(student, teacher, pseudo, ungated) > 0.1


def test_k1_training_is_exactly_plain_rd():
    teacher = random_teacher()
    spec = student_spec(teacher.channels, teacher.reductions)
    images = torch.rand(10, 3, 32, 32)
    # RD4AD's optimizer as it was: constant rate, no clipping, no EMA (the schedule is tested apart)
    plain = OptimConfig(lr_schedule="constant", warmup=0.0, clip_grad_norm=0.0, ema_decay=0.0)
    engine = CDDEngine.create(teacher, spec, 1, ObjectiveConfig(), plain, seed=5)
    fit_in_process(engine, images, torch.zeros(10, dtype=torch.long), epochs=2, batch_size=4, seed=9)

    # The baseline written out by hand: RD4AD's loop with the same seed, batches and optimizer.
    student = seeded_student(spec, 5)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.005, betas=(0.5, 0.999))
    generator = torch.Generator().manual_seed(9)
    for _ in range(2):
        for index in batches(torch.arange(10), 4, generator):
            features = teacher(images[index])
            loss = rd_loss(student(features), features, "flat")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, a), b in zip(
        engine.global_student.state_dict().items(), student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_every_loss_the_engine_and_the_proxy_compute_takes_the_runs_hard_share():
    """A hard share of 1 is the pixel form (a missing pass-through would use the default 0.1)."""
    from cdd_ray.evaluate.proxy import per_image_loss

    teacher = random_teacher()
    spec = student_spec(teacher.channels, teacher.reductions)
    images = torch.rand(8, 3, 32, 32)
    domains = torch.arange(8) % 2

    def trained(**objective) -> CDDEngine:
        engine = CDDEngine.create(teacher, spec, 2, ObjectiveConfig(**objective), OptimConfig(), seed=3)
        fit_in_process(engine, images, domains, epochs=2, batch_size=4, seed=4)
        return engine

    pixel, whole, hard = (
        trained(loss_form="pixel"),
        trained(loss_form="hard", hard_share=1.0),
        trained(loss_form="hard", hard_share=0.1),
    )

    @torch.no_grad()
    def weights(engine: CDDEngine) -> dict[str, torch.Tensor]:
        modules = {
            "global": engine.global_student,
            **{f"domain {k}": m for k, m in engine.domain_students.items()},
        }
        # flatten, not parameters_to_vector: the students' weights are channels-last
        return {n: torch.cat([p.detach().flatten() for p in m.parameters()]) for n, m in modules.items()}

    # the domain students train in domain_step, the global one through global_student_loss
    for name, a in weights(pixel).items():
        assert torch.equal(a, weights(whole)[name]), name
        assert (a - weights(hard)[name]).abs().max() > 1e-3, name
    student = pixel.evaluation_student()
    as_pixel = per_image_loss(teacher, student, images, "pixel")
    assert torch.allclose(per_image_loss(teacher, student, images, "hard", 1.0), as_pixel, atol=1e-6)
    assert not torch.allclose(per_image_loss(teacher, student, images, "hard", 0.1), as_pixel, atol=1e-3)


def test_teacher_trim_drops_the_teacher_term_of_the_most_disagreeing_images():
    torch.manual_seed(0)
    teacher = [torch.randn(4, 3, 2, 2)]
    targets = [t.clone() for t in teacher]
    targets[0][2] = -teacher[0][2]  # image 2: the other domains cannot reproduce the teacher there
    student = [torch.randn(4, 3, 2, 2)]
    trimmed = ObjectiveConfig(lambda_cross=1.0, lambda_teacher=1.0, teacher_trim=0.25)
    per_image = global_student_loss(student, teacher, targets, trimmed, reduction="none")
    cross = rd_loss(student, targets, reduction="none")
    teach = rd_loss(student, teacher, reduction="none")
    assert per_image[2] == pytest.approx(cross[2] / 2)  # only the cross term for the trimmed image
    keep = torch.tensor([0, 1, 3])
    assert torch.allclose(per_image[keep], (cross[keep] + teach[keep] * 4 / 3) / 2)


def test_relative_gate_drops_the_teacher_term_where_disagreement_is_in_the_top_share():
    from cdd_ray.train.engine import CDDEngine, OptimConfig
    from tests.models.test_teacher import random_teacher

    teacher = random_teacher()
    spec = student_spec(teacher.channels, teacher.reductions)
    engine = CDDEngine.create(teacher, spec, 2, ObjectiveConfig(gate_quantile=0.25), OptimConfig(), seed=0)
    feats = [torch.randn(2, 4, 4, 4)]
    targets = [f.clone() for f in feats]
    targets[0][:, :, :2, :2] *= -1  # a quarter of the positions disagree
    gate = engine.relative_gate(targets, feats)
    assert gate[0].shape == (2, 1, 4, 4)
    assert gate[0][:, :, :2, :2].sum() == 0 and gate[0].sum() == 2 * 12
    assert engine.relative_gate(targets, feats)[0].sum() == 2 * 12  # the running quantile holds


def test_feature_jitter_noise_is_scaled_by_each_positions_rms_and_leaves_the_input_alone():
    level = torch.zeros(2, 64, 3, 3)
    level[0, :, 0, 0] = 2.0  # RMS 2 at one position
    level[1, :, 1, 1] = 0.5  # RMS 0.5 at another; every other position is 0 and gets no noise
    before = level.clone()
    generator = torch.Generator().manual_seed(0)
    (jittered,) = jitter_features([level], 1.5, generator)
    assert torch.equal(level, before)
    noise = jittered - level
    assert noise[0, :, 0, 0].std().item() == pytest.approx(3.0, rel=0.25)
    assert noise[1, :, 1, 1].std().item() == pytest.approx(0.75, rel=0.25)
    assert noise[0, :, 1:, :].abs().max() == 0 and noise[1, :, 0, 0].abs().max() == 0
    assert jitter_features([level], 0.0)[0] is level
    with pytest.raises(ValueError, match="feature_jitter"):
        jitter_features([level], -1.0)


def engine_with(objective: ObjectiveConfig, num_domains: int, seed: int):
    """An engine on a random tiny teacher, four random images and the teacher's clean features."""
    teacher = random_teacher()
    spec = student_spec(teacher.channels, teacher.reductions)
    images = torch.rand(4, 3, 32, 32)
    engine = CDDEngine.create(teacher, spec, num_domains, objective, OptimConfig(), seed=seed)
    return engine, images, teacher(images)


def test_jittered_training_feeds_the_student_noisy_features_against_clean_targets():
    engine, images, clean = engine_with(ObjectiveConfig(feature_jitter=1.0), 2, seed=3)
    seen, outputs = [], []
    for student in [engine.global_student, *engine.domain_students.values()]:
        student.register_forward_pre_hook(lambda _, args: seen.append([f.clone() for f in args[0]]))
        student.register_forward_hook(lambda _, __, out: outputs.append([o.detach() for o in out]))
    generator = torch.Generator().manual_seed(3 + 104729)  # the engine's own stream
    expected = jitter_features(clean, 1.0, generator)
    loss = engine.domain_step(0, images, teacher_feats=clean)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], expected, strict=True))
    assert not torch.allclose(seen[0][0], clean[0])
    # the loss compares the student's output with the clean teacher features, not its noisy input
    assert loss == pytest.approx(float(rd_loss(outputs[0], clean)), rel=1e-5)
    assert loss != pytest.approx(float(rd_loss(outputs[0], seen[0])), rel=1e-3)
    seen.clear()
    outputs.clear()
    loss = engine.global_step(images, torch.tensor([0, 1, 0, 1]), teacher_feats=clean)
    global_inputs = seen[-1]  # the global student's input comes after the domain students' (targets)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], clean, strict=True))  # targets: clean input
    assert not torch.allclose(global_inputs[0], clean[0])
    # its loss: against the clean teacher features and the domain students' clean-input targets
    targets = pseudo_normal_targets([outputs[0], outputs[1]], torch.tensor([0, 1, 0, 1]))
    expected = global_student_loss(outputs[-1], clean, targets, engine.objective)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    # off by default: the student sees the teacher's features unchanged
    plain, _, _ = engine_with(ObjectiveConfig(), 1, seed=3)
    assert plain.student_input(clean, images) is clean


def test_cut_paste_copies_one_rectangle_of_the_previous_image_into_each_chosen_image():
    images = torch.stack([torch.full((3, 20, 20), float(i)) for i in range(4)])
    pasted = cut_paste(images, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(images[:, 0, 0, 0], torch.arange(4.0))  # the input is not changed
    for i in range(4):
        changed = (pasted[i] != images[i]).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert 2 <= h <= 6 and 2 <= w <= 6, (h, w)  # 10-30 % of the side
        assert changed.sum() == h * w  # one rectangle
        assert (pasted[i][:, changed] == float((i - 1) % 4)).all()  # from the previous-in-roll image
    assert torch.equal(cut_paste(images, 0.0), images)
    assert torch.equal(cut_paste(images[:1], 1.0), images[:1])
    with pytest.raises(ValueError, match="synthetic_anomalies"):
        cut_paste(images, 1.5)


def test_synthetic_anomalies_feed_the_student_the_teachers_features_of_pasted_images():
    engine, images, clean = engine_with(ObjectiveConfig(synthetic_anomalies=1.0), 2, seed=2)
    fed = engine.student_input(clean, images)
    expected = engine.teacher(cut_paste(images, 1.0, torch.Generator().manual_seed(2 + 104729)))
    assert all(torch.allclose(a, b) for a, b in zip(fed, expected, strict=True))
    assert not torch.allclose(fed[0], clean[0])
    # both steps: the student sees the pasted images' features, the loss compares with the clean ones
    inputs, outputs = [], []
    for student in [engine.global_student, *engine.domain_students.values()]:
        student.register_forward_pre_hook(lambda _, args: inputs.append([f.clone() for f in args[0]]))
        student.register_forward_hook(lambda _, __, out: outputs.append([o.detach() for o in out]))
    loss = engine.domain_step(0, images, teacher_feats=clean)
    assert not torch.allclose(inputs[0][0], clean[0])
    assert loss == pytest.approx(float(rd_loss(outputs[0], clean)), rel=1e-5)
    inputs.clear()
    outputs.clear()
    engine.global_step(images, torch.tensor([0, 1, 0, 1]), teacher_feats=clean)
    # the domain students give the targets from the clean features; the global student comes last
    assert all(torch.equal(a, b) for a, b in zip(inputs[0], clean, strict=True))
    assert not torch.allclose(inputs[-1][0], clean[0])


def test_the_augmentation_stream_restarts_from_each_steps_seed():
    engine, images, clean = engine_with(ObjectiveConfig(feature_jitter=1.0), 1, seed=0)
    engine.reseed_augmentation(77)
    first = engine.student_input(clean, images)
    assert torch.equal(first[0], jitter_features(clean, 1.0, torch.Generator().manual_seed(77))[0])
    engine.reseed_augmentation(77)
    assert torch.equal(engine.student_input(clean, images)[0], first[0])  # a resumed step draws alike
    engine.reseed_augmentation(78)
    assert not torch.equal(engine.student_input(clean, images)[0], first[0])  # another rank or step


def test_random_dihedral_gives_each_image_one_symmetry_of_its_group():
    image = torch.arange(2 * 3 * 3.0).reshape(2, 3, 3)
    flips = [image, image.flip(-1), image.flip(-2), image.flip(-1, -2)]
    group = {"flips": flips, "d4": flips + [f.transpose(-1, -2) for f in flips]}
    key = {name: {str(x.tolist()) for x in members} for name, members in group.items()}
    assert len(key["flips"]) == 4 and len(key["d4"]) == 8
    batch = image.expand(64, -1, -1, -1)
    for name in ("flips", "d4"):
        out = random_dihedral(batch, name, torch.Generator().manual_seed(0))
        assert {str(x.tolist()) for x in out} == key[name]  # every element drawn, nothing else
        assert torch.equal(out, random_dihedral(batch, name, torch.Generator().manual_seed(0)))
    assert random_dihedral(batch, "none") is batch
    with pytest.raises(ValueError, match="augment must be one of"):
        random_dihedral(batch, "rot")
    with pytest.raises(ValueError, match="square"):
        random_dihedral(torch.zeros(2, 3, 4, 6), "d4")


def test_augmented_steps_train_on_the_teachers_features_of_the_transformed_images():
    engine, images, clean = engine_with(ObjectiveConfig(augment="d4"), 2, seed=5)
    inputs, outputs = [], []
    for student in [engine.global_student, *engine.domain_students.values()]:
        student.register_forward_pre_hook(lambda _, args: inputs.append([f.clone() for f in args[0]]))
        student.register_forward_hook(lambda _, __, out: outputs.append([o.detach() for o in out]))
    transformed = random_dihedral(images, "d4", torch.Generator().manual_seed(5 + 104729))
    assert not torch.equal(transformed, images)
    expected = engine.teacher(transformed)
    loss = engine.domain_step(0, images, teacher_feats=clean)  # the cached features are not used
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(inputs[0], expected, strict=True))
    assert loss == pytest.approx(float(rd_loss(outputs[0], expected)), rel=1e-5)
    inputs.clear()
    outputs.clear()
    engine.reseed_augmentation(9)
    engine.global_step(images, torch.tensor([0, 1, 0, 1]), teacher_feats=clean)
    expected = engine.teacher(random_dihedral(images, "d4", torch.Generator().manual_seed(9)))
    # the domain students' targets and the global student's input: the same transformed features
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(inputs[0], expected, strict=True))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(inputs[-1], expected, strict=True))
