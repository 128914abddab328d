import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from cdd_ray.models.anomaly_map import DistanceStatistics, anomaly_map, gaussian_blur, image_scores


def test_blur_matches_scipy_gaussian_filter():
    maps = torch.rand(2, 40, 48, dtype=torch.float64)
    ours = gaussian_blur(maps, 4.0).numpy()
    reference = np.stack([ndimage.gaussian_filter(m, 4.0, mode="mirror", truncate=4.0) for m in maps.numpy()])
    assert np.abs(ours - reference).max() < 1e-6


def test_map_is_zero_where_student_matches_and_peaks_where_it_does_not():
    teacher = [torch.rand(2, 4, 8, 8) + 0.1, torch.rand(2, 6, 4, 4) + 0.1]
    student = [t.clone() for t in teacher]
    student[0][1, :, 2, 6] = -student[0][1, :, 2, 6]  # image 1, one position of level 1 reversed
    maps = anomaly_map(teacher, student, (32, 32), sigma=1.0)
    assert maps.shape == (2, 32, 32)
    assert maps[0].abs().max() < 1e-5
    peak = np.unravel_index(int(maps[1].argmax()), (32, 32))
    assert abs(peak[0] - 2 * 4 - 2) <= 2 and abs(peak[1] - 6 * 4 - 2) <= 2
    scores = image_scores(maps)
    assert scores[1] > scores[0] and scores[1] == maps[1].max()


def test_blur_with_zero_sigma_is_identity():
    maps = torch.rand(1, 5, 5)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


def test_cos_l2_sees_a_change_of_length_that_the_cosine_cannot():
    teacher = [torch.rand(2, 4, 8, 8) + 0.1, torch.rand(2, 6, 4, 4) + 0.1]
    student = [t.clone() for t in teacher]
    student[1][1, :, 1, 2] *= 3.0  # image 1: one position of level 2 three times as long, same direction
    cosine = anomaly_map(teacher, student, (32, 32), sigma=1.0)
    assert cosine.abs().max() < 1e-5
    scale = torch.tensor([[0.5, 2.0], [0.25, 4.0]])
    maps = anomaly_map(teacher, student, (32, 32), sigma=1.0, scale=scale)
    assert maps[0].abs().max() < 1e-5
    peak = np.unravel_index(int(maps[1].argmax()), (32, 32))
    assert abs(peak[0] - 1 * 8 - 4) <= 3 and abs(peak[1] - 2 * 8 - 4) <= 3
    # the level's Euclidean distance enters divided by its scale: doubling the scale halves the map
    halved = anomaly_map(teacher, student, (32, 32), sigma=1.0, scale=scale * torch.tensor([1.0, 2.0]))
    assert torch.allclose(halved, maps / 2, atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        anomaly_map(teacher, student, (32, 32), scale=torch.ones(3, 2))


def test_image_score_is_the_mean_of_the_top_fraction_and_the_maximum_at_zero():
    maps = torch.rand(3, 20, 20)
    assert torch.equal(image_scores(maps), maps.flatten(1).amax(1))
    top = maps.flatten(1).sort(dim=1, descending=True).values[:, :4].mean(1)  # floor(0.01 x 400) = 4
    assert torch.allclose(image_scores(maps, 0.01), top)
    assert torch.equal(image_scores(maps, 0.001), maps.flatten(1).amax(1))  # fewer than one pixel: max
    tens = torch.rand(2, 10, 10)  # 0.29 x 100 is 28.999... in floating point: still 29 pixels
    top29 = tens.flatten(1).sort(dim=1, descending=True).values[:, :29].mean(1)
    assert torch.allclose(image_scores(tens, 0.29), top29)


def test_distance_statistics_are_the_mean_over_images_and_add_up_over_parts():
    teacher = [torch.rand(5, 4, 8, 8), torch.rand(5, 6, 4, 4)]
    student = [torch.rand(5, 4, 8, 8), torch.rand(5, 6, 4, 4)]
    whole = DistanceStatistics(2)
    whole.update(teacher, student)
    expected = torch.tensor(
        [
            [
                (1 - F.cosine_similarity(t, s, dim=1)).mean().item(),
                (t - s).norm(dim=1).mean().item(),
            ]
            for t, s in zip(teacher, student, strict=True)
        ]
    )
    assert torch.allclose(whole.scale(), expected, atol=1e-6)
    parts = [DistanceStatistics(2), DistanceStatistics(2)]
    parts[0].update([t[:2] for t in teacher], [s[:2] for s in student])
    parts[1].update([t[2:] for t in teacher], [s[2:] for s in student])
    merged = DistanceStatistics(2)
    merged.sums, merged.images = parts[0].sums + parts[1].sums, parts[0].images + parts[1].images
    assert torch.allclose(merged.scale(), whole.scale(), atol=1e-6)
    with pytest.raises(ValueError, match="no training image"):
        DistanceStatistics(2).scale()
    copied = DistanceStatistics(2)
    copied.update(teacher, [t.clone() for t in teacher])  # a student that copies the teacher exactly
    with pytest.raises(ValueError, match="positive and finite"):
        copied.scale()
