import numpy as np
import pytest

from cdd_ray.data.synthetic import CATEGORIES, DEFECTS, SyntheticConfig, _render, generate_category

SMALL = SyntheticConfig(image_size=48, train_normal=4, test_normal=3, test_anomalous=8)


def test_every_category_has_four_defect_types_with_exact_masks():
    assert len(CATEGORIES) >= 4
    for category in CATEGORIES:
        samples = list(generate_category(category, SMALL))
        assert len(samples) == 4 + 3 + 8
        anomalous = [s for s in samples if s.label]
        assert {s.defect_type for s in anomalous} == set(DEFECTS[category]) and len(DEFECTS[category]) >= 4
        for sample in anomalous:
            assert sample.mask.shape == (48, 48) and 0 < sample.mask.mean() < 0.5, (
                category,
                sample.defect_type,
            )
        assert all(s.mask is None and s.image.dtype == np.uint8 for s in samples if not s.label)


def test_generation_is_deterministic_and_seeded():
    first = [s.image for s in generate_category("pill", SMALL)]
    again = [s.image for s in generate_category("pill", SMALL)]
    other = [s.image for s in generate_category("pill", SyntheticConfig(**{**vars(SMALL), "seed": 1}))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


def test_normal_images_vary():
    normals = [s.image.astype(float) for s in generate_category("bolts", SMALL) if not s.label]
    assert min(np.abs(a - b).mean() for a, b in zip(normals, normals[1:], strict=False)) > 1.0


@pytest.mark.parametrize("category", CATEGORIES)
def test_masks_are_exactly_where_the_defect_changed_the_image(category):
    for defect in DEFECTS[category]:
        for index in range(3):
            seed = [7, CATEGORIES.index(category), 1, 1, index]
            normal, _ = _render(category, np.random.default_rng(seed), 48, None)
            image, mask = _render(category, np.random.default_rng(seed), 48, defect)
            changed = np.abs(image.astype(int) - normal.astype(int)).max(axis=2) > 0
            assert not (changed & ~mask).any(), (category, defect, "pixels changed outside the mask")
            assert changed[mask].mean() > 0.5, (category, defect, "mask covers unchanged pixels")
