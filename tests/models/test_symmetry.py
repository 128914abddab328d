import pytest
import torch

from cdd_ray.models.detector import DistillationDetector
from cdd_ray.models.distillation.student import Student, student_spec
from cdd_ray.models.symmetry import apply, group_elements, undo
from tests.models.test_teacher import random_teacher


@pytest.mark.parametrize(("group", "size"), [("none", 1), ("flips", 4), ("d4", 8)])
def test_each_group_holds_distinct_symmetries_that_undo_inverts(group, size):
    images = torch.randn(2, 3, 6, 6)
    elements = group_elements(group)
    assert len(elements) == size and elements[0] == ((), False)
    assert len({tuple(apply(images, s).flatten().tolist()) for s in elements}) == size
    for symmetry in elements:
        assert torch.equal(undo(apply(images, symmetry), symmetry), images)
    with pytest.raises(ValueError, match="must be one of"):
        group_elements("rot90")


def detector(group: str) -> DistillationDetector:
    torch.manual_seed(0)
    teacher = random_teacher()
    student = Student(student_spec(teacher.channels, teacher.reductions))
    return DistillationDetector(
        teacher, student, sigma=1.0, top_fraction=0.01, test_time_augment=group
    ).eval()


@pytest.mark.parametrize("group", ["flips", "d4"])
def test_test_time_augmentation_averages_the_maps_of_each_symmetry_turned_back(group):
    images = torch.rand(3, 3, 32, 32)
    plain, augmented = detector("none"), detector(group)
    maps, scores = augmented(images)
    expected = torch.stack([undo(plain(apply(images, s))[0], s) for s in group_elements(group)]).mean(0)
    assert torch.allclose(maps, expected, atol=1e-6)
    assert not torch.allclose(maps, plain(images)[0], atol=1e-4)  # the random student is not symmetric
    # the averaged map commutes with the group: a transformed image gets the transformed map, same score
    for symmetry in group_elements(group):
        moved_maps, moved_scores = augmented(apply(images, symmetry))
        assert torch.allclose(moved_maps, apply(maps, symmetry), atol=1e-5)
        assert torch.allclose(moved_scores, scores, atol=1e-5)


def test_d4_refuses_an_image_that_is_not_square():
    with pytest.raises(ValueError, match="d4 needs square images, got \\(32, 48\\)"):
        detector("d4")(torch.rand(1, 3, 32, 48))
