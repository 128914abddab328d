import pytest
import torch

from cdd_ray.models.distillation.student import Student, StudentConfig, build_student, student_spec
from tests.models.test_teacher import random_teacher

BACKBONES = [("test_resnet", 32), ("test_efficientnet", 32), ("resnet18", 64), ("tf_efficientnet_lite0", 64)]


@pytest.mark.parametrize(("backbone", "size"), BACKBONES)
def test_student_reconstructs_teacher_shapes_and_trains_everywhere(backbone, size):
    teacher = random_teacher(backbone)
    student = build_student(teacher.channels, teacher.reductions, backbone)
    features = teacher(torch.rand(2, 3, size, size))
    outputs = student(features)
    assert [o.shape for o in outputs] == [f.shape for f in features]
    assert all(torch.isfinite(o).all() for o in outputs)
    sum(o.mean() for o in outputs).backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing[:5]}"


def test_wide_resnet50_student_follows_rd4ad():
    spec = student_spec([256, 512, 1024], [4, 8, 16], "wide_resnet50_2")
    student = Student(spec)
    assert student.bottleneck.out_channels == 2048
    first = student.bottleneck.embed[0]
    assert first.body[0][0].in_channels == 3072 and first.body[1][0].stride == (2, 2)
    assert first.body[1][0].out_channels == 1024  # wide: bottleneck width 2 x 512
    assert [len(stage) for stage in student.decoder.stages] == [3, 4, 6]
    features = [torch.rand(1, 256, 16, 16), torch.rand(1, 512, 8, 8), torch.rand(1, 1024, 4, 4)]
    with torch.no_grad():
        embedding = student.bottleneck(features)
        outputs = student.decoder(embedding)
    assert embedding.shape == (1, 2048, 2, 2)
    assert [tuple(o.shape[1:]) for o in outputs] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4)]


def test_embedding_width_factor_narrows_only_the_ocbe():
    from dataclasses import replace

    wide = student_spec([256, 512, 1024], [4, 8, 16], "wide_resnet50_2")
    narrow = Student(replace(wide, embedding_width_factor=1))
    reference = Student(wide)
    assert [b.body[1][0].out_channels for b in narrow.bottleneck.embed] == [512] * 3
    assert [b.body[1][0].out_channels for b in reference.bottleneck.embed] == [1024] * 3

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(narrow.decoder) == count(reference.decoder)
    assert count(narrow.bottleneck) < count(reference.bottleneck)


def test_reductions_must_double():
    with pytest.raises(ValueError, match="powers of two"):
        Student(student_spec([8, 16, 32], [4, 12, 16]))


def test_embedding_stride_one_keeps_the_embedding_on_the_level_3_grid():
    teacher = random_teacher("tf_efficientnet_lite0")
    features = teacher(torch.rand(2, 3, 64, 64))
    shapes = {}
    for stride in (1, 2):
        student = Student(student_spec(teacher.channels, teacher.reductions, student=StudentConfig(stride)))
        with torch.no_grad():
            shapes[stride] = tuple(student.bottleneck(features).shape[-2:])
            assert [o.shape for o in student(features)] == [f.shape for f in features]
    level3 = tuple(features[2].shape[-2:])
    assert shapes[1] == level3 and shapes[2] == (level3[0] // 2, level3[1] // 2)


def test_width_factor_widens_every_block_and_overrides_the_backbones():
    def widths(spec):
        student = Student(spec)
        return [b.body[1][0].out_channels for b in student.bottleneck.embed] + [
            stage[0].body[0][0].out_channels for stage in student.decoder.stages
        ]

    base = widths(student_spec([24, 40, 112], [4, 8, 16]))
    wide = widths(student_spec([24, 40, 112], [4, 8, 16], student=StudentConfig(width_factor=4)))
    assert wide == [4 * w for w in base]
    rd4ad = student_spec([256, 512, 1024], [4, 8, 16], "wide_resnet50_2")
    narrowed = student_spec([256, 512, 1024], [4, 8, 16], "wide_resnet50_2", StudentConfig(width_factor=1))
    assert (rd4ad.width_factor, narrowed.width_factor) == (2, 1)


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"embedding_stride": 4}, "embedding_stride"), ({"width_factor": 0}, "width_factor")],
)
def test_bad_student_settings_are_refused_by_name(setting, message):
    with pytest.raises(ValueError, match=message):
        student_spec([24, 40, 112], [4, 8, 16], student=StudentConfig(**setting))


def test_the_channels_last_student_is_the_same_function_and_its_weights_load_either_way():
    teacher = random_teacher()
    features = teacher(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    students = {}
    for layout in (True, False):
        torch.manual_seed(0)
        spec = student_spec(teacher.channels, teacher.reductions, student=StudentConfig(channels_last=layout))
        students[layout] = Student(spec).eval()
    fast, plain = students[True], students[False]
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(w.is_contiguous() for w in convs)  # a 3x3 kernel is in one layout or the other
    assert all(
        torch.equal(a, b)
        for a, b in zip(fast.state_dict().values(), plain.state_dict().values(), strict=True)
    )
    with torch.no_grad():
        for a, b in zip(fast(features), plain(features), strict=True):
            assert a.is_contiguous(memory_format=torch.channels_last) and b.is_contiguous()
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    for module in plain.modules():  # a checkpoint of one layout loads into the other
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data.add_(0.01)
    fast.load_state_dict(plain.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(fast.state_dict().values(), plain.state_dict().values(), strict=True)
    )
    assert convs[0].is_contiguous(memory_format=torch.channels_last)
