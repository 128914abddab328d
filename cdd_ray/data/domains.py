"""Domain partition strategies: a seeded, disjoint assignment of every training sample to one of K domains.

- ``random``: a seeded permutation dealt round-robin; domain sizes differ by at most one. Each
  domain keeps the whole set's anomaly ratio in expectation: it dilutes anomalies, no more.
- ``cluster``: k-means on pooled teacher embeddings, then a capacity-capped assignment (no domain
  above ``cap_factor * N / K``), so that similar images (and so one anomaly type) land together.
- ``outlier``: a label-free outlier score (mean distance of the embedding to its k nearest
  neighbours) sends the most suspicious images to ``outlier_domains`` domains of their own and deals
  the rest at random over the others, leaving those as clean as the score allows.

The assignment depends only on (strategy, K, seed, sample ids, embeddings), never on labels.

Example::

    domains = assign_domains(sample_ids, "cluster", 3, seed=0, embeddings=emb)
"""

from __future__ import annotations

import math

import numpy as np

STRATEGIES = ("random", "cluster", "outlier")
HOLDOUT = -1  # the domain id of held-out training images (label-free validation, never trained on)
DOMAINS_FILE = "domains.json"  # a run's manifest: {"assignment": {sample_id: domain}, "holdout": [...], ...}


class PartitionError(ValueError):
    """The partition cannot be made; the message names the setting."""


def _order(sample_ids: list[str], seed: int) -> np.ndarray:
    """A seeded permutation that depends on the ids, not on the order rows arrived in."""
    canonical = np.argsort(np.asarray(sample_ids, dtype=object).astype(str), kind="stable")
    return canonical[np.random.default_rng(seed).permutation(len(sample_ids))]


def holdout_mask(sample_ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """A seeded share of the (noisy, unlabeled) training set kept out of training, for a proxy metric."""
    mask = np.zeros(len(sample_ids), dtype=bool)
    mask[_order(sample_ids, seed + 7919)[: int(round(fraction * len(sample_ids)))]] = True
    return mask


def random_partition(sample_ids: list[str], num_domains: int, seed: int) -> np.ndarray:
    domains = np.empty(len(sample_ids), dtype=np.int64)
    domains[_order(sample_ids, seed)] = np.arange(len(sample_ids)) % num_domains
    return domains


def _normalized(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float64)
    return embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)


def cluster_partition(
    sample_ids: list[str], embeddings: np.ndarray, num_domains: int, seed: int, cap_factor: float = 1.5
) -> np.ndarray:
    n = len(sample_ids)
    points = _normalized(embeddings)
    from sklearn.cluster import KMeans  # lazily: sklearn costs ~1.3 s in every Ray worker's start

    centers = KMeans(num_domains, n_init=10, random_state=seed).fit(points).cluster_centers_
    distances = ((points[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    capacity = max(1, math.ceil(cap_factor * n / num_domains))
    domains = np.full(n, -1, dtype=np.int64)
    sizes = np.zeros(num_domains, dtype=np.int64)
    for flat in np.argsort(distances, axis=None, kind="stable"):
        sample, domain = divmod(int(flat), num_domains)
        if domains[sample] < 0 and sizes[domain] < capacity:
            domains[sample] = domain
            sizes[domain] += 1
    for empty in np.flatnonzero(sizes == 0):
        donors = np.flatnonzero(domains == np.argmax(sizes))
        moved = donors[np.argmin(distances[donors, empty])]
        sizes[domains[moved]] -= 1
        domains[moved], sizes[empty] = empty, 1
    return domains


def outlier_scores(embeddings: np.ndarray, neighbours: int = 5) -> np.ndarray:
    points = _normalized(embeddings)
    distances = np.sqrt(np.clip(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1), 0, None))
    np.fill_diagonal(distances, np.inf)
    k = min(neighbours, len(points) - 1)
    return np.sort(distances, axis=1)[:, :k].mean(1)


def outlier_partition(
    sample_ids: list[str], embeddings: np.ndarray, num_domains: int, seed: int, outlier_domains: int = 1
) -> np.ndarray:
    if outlier_domains >= num_domains:
        raise PartitionError(
            f"data.outlier_domains={outlier_domains} must be below train.num_domains={num_domains}"
        )
    n = len(sample_ids)
    scores = outlier_scores(embeddings)
    suspicious = np.argsort(-scores, kind="stable")[: round(n * outlier_domains / num_domains)]
    domains = np.empty(n, dtype=np.int64)
    domains[suspicious] = np.arange(len(suspicious)) % outlier_domains
    rest = np.setdiff1d(np.arange(n), suspicious)
    rest_ids = [sample_ids[i] for i in rest]
    domains[rest] = outlier_domains + random_partition(rest_ids, num_domains - outlier_domains, seed)
    return domains


def assign_domains(
    sample_ids: list[str],
    strategy: str,
    num_domains: int,
    seed: int,
    embeddings: np.ndarray | None = None,
    outlier_domains: int = 1,
) -> np.ndarray:
    if strategy not in STRATEGIES:
        raise PartitionError(f"data.partition must be one of {STRATEGIES}, got {strategy!r}")
    if num_domains < 1:
        raise PartitionError(f"train.num_domains must be >= 1, got {num_domains}")
    if num_domains > len(sample_ids):
        raise PartitionError(
            f"train.num_domains={num_domains} is larger than the training set ({len(sample_ids)} images)"
        )
    if num_domains == 1:
        return np.zeros(len(sample_ids), dtype=np.int64)
    if strategy == "random":
        return random_partition(sample_ids, num_domains, seed)
    if embeddings is None or len(embeddings) != len(sample_ids):
        raise PartitionError(f"partition {strategy!r} needs one embedding per sample")
    if strategy == "cluster":
        return cluster_partition(sample_ids, embeddings, num_domains, seed)
    return outlier_partition(sample_ids, embeddings, num_domains, seed, outlier_domains)


def domain_report(domains: np.ndarray, injected: np.ndarray, num_domains: int) -> list[dict]:
    """Per-domain size and share of injected anomalies (analysis only; never fed to training)."""
    report = []
    for k in range(num_domains):
        members = domains == k
        size = int(members.sum())
        count = int(injected[members].sum())
        report.append({"domain": k, "size": size, "injected": count, "injected_share": count / max(1, size)})
    return report
