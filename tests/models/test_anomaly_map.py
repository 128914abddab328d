import numpy as np
import torch
from scipy import ndimage

from cdd_ray.models.anomaly_map import anomaly_map, gaussian_blur, image_scores


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
