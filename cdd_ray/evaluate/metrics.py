"""Detection and localization metrics: AUROC, F1-max and an exact, fast AUPRO.

AUPRO follows the MVTec AD definition: every connected component (8-connectivity) of every
ground-truth mask is one region; at a threshold, PRO is the mean over regions of the share of the
region's pixels above it, FPR is the share of all normal pixels of the set above it. The PRO(FPR)
curve is integrated up to ``fpr_limit`` (0.3) and divided by it, so a perfect detector scores 1.

Exactness without a threshold loop: pixels are sorted by score once (``Ranking``); walking down
that order, each normal pixel adds 1/N_normal to FPR and each pixel of region r adds 1/(|r| * R)
to PRO, and the curve is read at the last pixel of every group of tied scores (every distinct
threshold). Pixel AUROC and F1-max read their true and false positive counts from the same order
(the same points and trapezoids as scikit-learn's ``roc_auc_score`` and ``precision_recall_curve``,
which sorted the pixel scores twice more).

Example::

    metrics = compute_metrics(image_scores, image_labels, anomaly_maps, masks)
"""

from __future__ import annotations

import numpy as np

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _check_binary(labels: np.ndarray, what: str) -> None:
    present = np.unique(labels)
    if not (len(present) == 2 and set(present.tolist()) == {0, 1}):
        raise ValueError(f"{what} needs both normal (0) and anomalous (1) samples, got {present.tolist()}")


class Ranking:
    """Scores sorted once from the highest down; every curve below is read from this order.

    ``order`` (M,) sorts the flattened scores descending; ``last_of_tie`` (M,) is True at the last
    position of every group of tied scores (the curves' points: one per distinct threshold);
    ``thresholds`` are those distinct scores, descending. ``what`` names the scores in errors.
    Raises ValueError for no scores, and for NaN (it has no rank) or infinite scores (refused as
    scikit-learn refuses them; ``pro_curve`` accepted infinities before it used this class)."""

    def __init__(self, scores: np.ndarray, what: str = "scores"):
        flat = np.asarray(scores).ravel()
        if flat.size == 0:
            raise ValueError(f"{what}: no values to rank")
        bad = int(flat.size - np.isfinite(flat).sum())
        if bad:
            raise ValueError(f"{what}: {bad} of {flat.size} values are NaN or infinite")
        self.what = what
        self.size = flat.size
        self.order = np.argsort(flat)[::-1]  # the order inside a tie does not matter
        ranked = flat[self.order]
        self.last_of_tie = np.append(ranked[1:] != ranked[:-1], True)
        self.thresholds = ranked[self.last_of_tie]

    def counts(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives (float64, one per distinct threshold) when a score >= the
        threshold counts as anomalous; ``labels``: 0/1 integers, one per score, 1 = anomalous."""
        labels = np.asarray(labels).ravel()
        if labels.size != self.size:
            raise ValueError(f"{labels.size} labels for {self.size} {self.what}")
        ends = np.flatnonzero(self.last_of_tie)
        tp = np.cumsum(labels[self.order], dtype=np.int64)[ends]
        return tp.astype(np.float64), (ends + 1 - tp).astype(np.float64)


def _binary(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels).ravel().astype(np.int64)
    _check_binary(labels, what)
    return labels


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: trapezoids between the points of every distinct threshold, as
    scikit-learn's ``roc_auc_score`` computes it. ``scores`` and ``labels`` (0/1) of any equal size."""
    return auroc_of(Ranking(scores), labels)


def auroc_of(ranking: Ranking, labels: np.ndarray) -> float:
    """``auroc`` of scores already ranked (``compute_metrics`` ranks the pixel scores once)."""
    fpr, tpr = roc_points(ranking, labels)
    return float(np.trapezoid(tpr, fpr))


def roc_points(ranking: Ranking, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve: false and true positive rates (float64, from (0, 0) to (1, 1)), one point
    per distinct threshold, highest threshold first; the points ``auroc`` integrates (and
    scikit-learn's ``roc_curve`` with ``drop_intermediate=False``)."""
    tp, fp = ranking.counts(_binary(labels, "AUROC"))
    return np.concatenate([[0.0], fp / fp[-1]]), np.concatenate([[0.0], tp / tp[-1]])


def precision_recall_points(ranking: Ranking, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall (float64), one point per distinct threshold, highest threshold first
    (scikit-learn's ``precision_recall_curve`` lists the same points lowest threshold first and
    appends (precision 1, recall 0))."""
    tp, fp = ranking.counts(_binary(labels, "F1-max"))
    return tp / (tp + fp), tp / tp[-1]


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    return f1_max_threshold(scores, labels)[0]


def f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The largest F1 over all thresholds, and the threshold that gives it (a score counts as
    anomalous when it is >= the threshold; of equal F1s, the lowest threshold, as scikit-learn's
    ``precision_recall_curve`` orders them)."""
    return f1_max_of(Ranking(scores), labels)


def f1_max_of(ranking: Ranking, labels: np.ndarray) -> tuple[float, float]:
    """``f1_max_threshold`` of scores already ranked."""
    precision, recall = precision_recall_points(ranking, labels)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), float(ranking.thresholds[best])


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of each mask, numbered 1..R across the whole set (0 = normal)."""
    from scipy import ndimage

    regions = np.zeros(masks.shape, dtype=np.int64)
    total = 0
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask > 0, structure=EIGHT_CONNECTED)
        regions[index] = np.where(labelled > 0, labelled + total, 0)
        total += count
    return regions, total


def pro_curve(
    maps: np.ndarray, masks: np.ndarray, ranking: Ranking | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO at every distinct threshold, from the highest score down, starting at (0, 0).
    ``ranking``: the maps' ``Ranking`` when already made (of the same number of pixels)."""
    maps = np.asarray(maps)
    masks = np.asarray(masks)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (N, H, W)")
    regions, region_count = label_regions(masks)
    if region_count == 0:
        raise ValueError("AUPRO needs at least one anomalous pixel in the masks")
    normal_count = int((regions == 0).sum())
    if normal_count == 0:
        raise ValueError("AUPRO needs at least one normal pixel in the masks")
    region_ids = regions.ravel()
    region_sizes = np.bincount(region_ids, minlength=region_count + 1).astype(np.float64)
    pro_weight = np.zeros(region_count + 1)
    pro_weight[1:] = 1.0 / (region_sizes[1:] * region_count)
    ranking = ranking or Ranking(maps, "anomaly maps")
    if ranking.size != maps.size:
        raise ValueError(f"a ranking of {ranking.size} scores for maps of {maps.size} pixels")
    sorted_regions = region_ids[ranking.order]
    fpr = np.cumsum(sorted_regions == 0) / normal_count
    pro = np.cumsum(pro_weight[sorted_regions])
    ends = ranking.last_of_tie
    return np.concatenate([[0.0], fpr[ends]]), np.concatenate([[0.0], pro[ends]])


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (in [0, 1])."""
    return aupro_of_curve(*pro_curve(maps, masks), fpr_limit)


def aupro_of_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """``aupro`` of a curve ``pro_curve`` returned. Raises ValueError for ``fpr_limit`` outside (0, 1]."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    fpr, pro = np.clip(fpr, 0.0, 1.0), np.clip(pro, 0.0, 1.0)
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit:
        beyond = np.searchsorted(fpr, fpr_limit, side="left")
        y_limit = np.interp(fpr_limit, fpr[beyond - 1 : beyond + 1], pro[beyond - 1 : beyond + 1])
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return float(np.trapezoid(y, x) / fpr_limit)


def compute_metrics(
    image_scores: np.ndarray,
    image_labels: np.ndarray,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    fpr_limit: float = 0.3,
    curves: dict | None = None,
) -> dict[str, float]:
    """The five numbers we report (image/pixel AUROC, AUPRO, image/pixel F1-max) and the F1-max
    thresholds (``image_threshold``, ``pixel_threshold``, in the scores' own units: a run's decision
    thresholds). A ``curves`` dict receives the PRO curve (``"pro"``: (fpr, pro)) for a report to
    plot without computing it again."""
    image_ranking = Ranking(image_scores, "image scores")
    image_f1, image_threshold = f1_max_of(image_ranking, image_labels)
    result = {
        "image_auroc": auroc_of(image_ranking, image_labels),
        "image_f1_max": image_f1,
        "image_threshold": image_threshold,
    }
    if maps is not None and masks is not None:
        pixel_labels = (np.asarray(masks) > 0).astype(np.uint8)
        ranking = Ranking(maps, "anomaly maps")  # one sort of the pixel scores for all three
        result["pixel_auroc"] = auroc_of(ranking, pixel_labels)
        result["pixel_f1_max"], result["pixel_threshold"] = f1_max_of(ranking, pixel_labels)
        curve = pro_curve(maps, pixel_labels, ranking)
        result["aupro"] = aupro_of_curve(*curve, fpr_limit)
        if curves is not None:
            curves["pro"] = curve
    return result
