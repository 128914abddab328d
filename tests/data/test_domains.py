import numpy as np
import pytest

from cdd_ray.data.domains import PartitionError, assign_domains, domain_report, outlier_scores

IDS = [f"s{i:03d}" for i in range(60)]


def clustered_embeddings(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(3), 20)
    centers = np.eye(8)[:3] * 5
    return centers[groups] + rng.normal(0, 0.2, (60, 8)), groups


@pytest.mark.parametrize("strategy", ["random", "cluster", "outlier"])
@pytest.mark.parametrize("k", [2, 3, 6])
def test_partition_is_disjoint_covering_and_seeded(strategy, k):
    vectors, _ = clustered_embeddings()
    domains = assign_domains(IDS, strategy, k, seed=1, embeddings=vectors)
    assert domains.shape == (60,) and set(domains.tolist()) == set(range(k))
    assert np.array_equal(domains, assign_domains(IDS, strategy, k, seed=1, embeddings=vectors))


def test_random_partition_is_balanced_and_independent_of_row_order():
    domains = assign_domains(IDS, "random", 7, seed=0)
    sizes = np.bincount(domains)
    assert sizes.max() - sizes.min() <= 1
    shuffled = list(reversed(IDS))
    again = assign_domains(shuffled, "random", 7, seed=0)
    assert dict(zip(IDS, domains, strict=True)) == dict(zip(shuffled, again, strict=True))
    assert not np.array_equal(domains, assign_domains(IDS, "random", 7, seed=1))


def test_cluster_partition_keeps_similar_images_together():
    vectors, groups = clustered_embeddings()
    domains = assign_domains(IDS, "cluster", 3, seed=0, embeddings=vectors)
    for group in range(3):
        assert len(set(domains[groups == group].tolist())) == 1


def test_cluster_partition_respects_the_size_cap():
    vectors, _ = clustered_embeddings()
    vectors[:50] = vectors[0]  # one huge cluster
    domains = assign_domains(IDS, "cluster", 3, seed=0, embeddings=vectors)
    assert np.bincount(domains).max() <= 30


def test_outlier_partition_isolates_outliers():
    rng = np.random.default_rng(0)
    vectors = np.ones((60, 8)) + rng.normal(0, 0.01, (60, 8))
    vectors[[5, 17, 33]] = rng.normal(0, 1, (3, 8))
    scores = outlier_scores(vectors)
    assert set(np.argsort(-scores)[:3].tolist()) == {5, 17, 33}
    domains = assign_domains(IDS, "outlier", 4, seed=0, embeddings=vectors)
    assert set(domains[[5, 17, 33]].tolist()) == {0}
    report = domain_report(domains, np.isin(np.arange(60), [5, 17, 33]), 4)
    assert report[0]["injected"] == 3 and all(r["injected"] == 0 for r in report[1:])


def test_bad_partition_settings_are_named():
    with pytest.raises(PartitionError, match="larger than the training set"):
        assign_domains(IDS[:3], "random", 4, seed=0)
    with pytest.raises(PartitionError, match="data.outlier_domains"):
        assign_domains(IDS, "outlier", 2, seed=0, embeddings=np.ones((60, 2)), outlier_domains=2)
    with pytest.raises(PartitionError, match="needs one embedding"):
        assign_domains(IDS, "cluster", 2, seed=0)
