import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from cdd_ray.evaluate.metrics import (
    Ranking,
    aupro,
    auroc,
    compute_metrics,
    f1_max,
    f1_max_threshold,
    precision_recall_points,
    pro_curve,
    roc_points,
)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Slow and obvious: a threshold at every distinct score, regions and FPR counted from scratch."""
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == r) for r in range(1, count + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        fpr = (above & normal).sum() / normal.sum()
        pro = np.mean([above[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    grid = np.linspace(0, limit, 30001)
    # PRO(FPR) is a step-free monotone curve here; sample it densely and integrate.
    inside = fpr <= limit
    x = np.append(fpr[inside], limit)
    y = np.append(pro[inside], np.interp(limit, fpr, pro))
    return float(np.trapezoid(np.interp(grid, x, y), grid) / limit)


def random_case(seed: int, n: int = 4, size: int = 24, levels: int | None = None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for index in range(n):
        for _ in range(rng.integers(0, 3)):
            r, c = rng.integers(0, size - 6, 2)
            h, w = rng.integers(2, 7, 2)
            masks[index, r : r + h, c : c + w] = 1
    masks[0, 2:5, 2:5] = 1  # at least one region
    maps = rng.random((n, size, size)) + 0.6 * masks
    if levels:
        maps = np.round(maps * levels) / levels  # many ties
    return maps, masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 7])
def test_aupro_matches_slow_reference(seed, levels):
    maps, masks = random_case(seed, levels=levels)
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=1e-3)


def test_aupro_structured_cases():
    masks = np.zeros((2, 16, 16), dtype=np.uint8)
    masks[0, 4:8, 4:8] = 1
    perfect = masks.astype(float)
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-9)
    inverted = 1.0 - perfect
    assert aupro(inverted, masks) == pytest.approx(0.0, abs=1e-9)
    constant = np.zeros_like(perfect)  # one threshold: FPR jumps from 0 to 1
    assert aupro(constant, masks) == pytest.approx(0.15, abs=1e-9)  # PRO = FPR line up to 0.3
    assert aupro(constant, masks) == pytest.approx(reference_aupro(constant, masks), abs=1e-3)


def test_aupro_weights_every_region_equally():
    masks = np.zeros((1, 20, 20), dtype=np.uint8)
    masks[0, 0:2, 0:2] = 1  # small region, found
    masks[0, 10:20, 10:20] = 1  # large region, missed
    maps = np.zeros((1, 20, 20))
    maps[0, 0:2, 0:2] = 1.0
    # At FPR 0 the PRO is 0.5 (one of two regions); pixel-weighted overlap would give 4/104.
    assert aupro(maps, masks) > 0.5


def test_aupro_needs_anomalous_pixels():
    with pytest.raises(ValueError, match="anomalous pixel"):
        aupro(np.random.rand(2, 8, 8), np.zeros((2, 8, 8)))


def test_aupro_never_exceeds_one():
    for seed in range(5):
        maps, masks = random_case(seed, levels=3)
        assert 0.0 <= aupro(maps, masks) <= 1.0


def test_auroc_and_f1_max():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.random(200) + labels * 0.5
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    thresholds = np.unique(scores)
    best, best_threshold = 0.0, None
    for t in thresholds:
        predicted = scores >= t
        tp = (predicted & (labels == 1)).sum()
        precision, recall = tp / predicted.sum(), tp / (labels == 1).sum()
        f1 = 0 if tp == 0 else 2 * precision * recall / (precision + recall)
        if f1 > best:
            best, best_threshold = f1, t
    assert f1_max(scores, labels) == pytest.approx(best)
    assert f1_max_threshold(scores, labels) == pytest.approx((best, best_threshold))
    with pytest.raises(ValueError, match="both normal"):
        auroc(scores, np.ones(200))


@pytest.mark.parametrize("levels", [None, 5])
@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_from_one_sort_match_scikit_learn(seed, levels):
    from sklearn.metrics import precision_recall_curve

    maps, masks = random_case(seed, n=6, size=32, levels=levels)
    maps = maps.astype(np.float32)  # as the detectors give them
    result = compute_metrics(maps.reshape(6, -1).max(1), np.r_[1, 0, 1, 0, 1, 0], maps, masks)
    labels, scores = masks.ravel(), maps.ravel()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    best = int(np.argmax(f1[:-1]))
    assert result["pixel_f1_max"] == pytest.approx(f1[best], abs=1e-12)
    assert result["pixel_threshold"] == thresholds[best]
    assert result["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=2e-4)


@pytest.mark.parametrize("levels", [None, 4])
def test_roc_and_precision_recall_points_are_scikit_learns(levels):
    from sklearn.metrics import precision_recall_curve, roc_curve

    rng = np.random.default_rng(levels or 0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels
    if levels:  # ties: one point per distinct threshold
        scores = np.round(scores * levels) / levels
    ranking = Ranking(scores)
    fpr, tpr = roc_points(ranking, labels)
    expected_fpr, expected_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, expected_tpr, atol=1e-12)
    precision, recall = precision_recall_points(ranking, labels)
    expected_precision, expected_recall, _ = precision_recall_curve(labels, scores)
    # scikit-learn: lowest threshold first, then the (1, 0) end point
    np.testing.assert_allclose(precision, expected_precision[:-1][::-1], atol=1e-12)
    np.testing.assert_allclose(recall, expected_recall[:-1][::-1], atol=1e-12)
    assert auroc(scores, labels) == pytest.approx(np.trapezoid(expected_tpr, expected_fpr), abs=1e-12)


def test_scores_without_a_rank_or_labels_of_another_length_are_refused():
    scores, labels = np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1])
    with pytest.raises(ValueError, match="scores: 1 of 3 values are NaN or infinite"):
        auroc(scores, labels)
    with pytest.raises(ValueError, match="2 labels for 3 scores"):
        f1_max_threshold(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="no values"):
        auroc(np.array([]), np.array([]))
    maps, masks = random_case(0)
    maps[1, 3, 4] = np.inf
    with pytest.raises(ValueError, match="anomaly maps: 1 of"):
        compute_metrics(np.r_[1.0, 0, 1, 0], np.r_[1, 0, 1, 0], maps, masks)
    with pytest.raises(ValueError, match="a ranking of 3 scores for maps of"):
        pro_curve(maps, masks, Ranking(np.array([0.1, 0.2, 0.3])))


def test_compute_metrics_keys():
    maps, masks = random_case(1)
    labels = masks.reshape(len(masks), -1).max(1)
    labels[-1] = 0 if labels.all() else labels[-1]
    result = compute_metrics(maps.reshape(len(maps), -1).max(1), np.r_[1, 0, 1, 0], maps, masks)
    assert set(result) == {
        "image_auroc",
        "image_f1_max",
        "image_threshold",
        "pixel_auroc",
        "pixel_f1_max",
        "pixel_threshold",
        "aupro",
    }
