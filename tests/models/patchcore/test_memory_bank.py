import importlib.util

import pytest
import torch

from cdd_ray.models.patchcore.coreset import coreset_size, greedy_coreset, random_projection
from cdd_ray.models.patchcore.features import patch_features, to_patches
from cdd_ray.models.patchcore.memory_bank import MemoryBank, nearest_neighbours, score_patches
from cdd_ray.models.patchcore.model import MemoryBankConfig, build_memory_bank
from cdd_ray.models.patchcore.softpatch import keep_mask, patch_outlier_scores

FAISS = importlib.util.find_spec("faiss") is not None
BACKENDS = [
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not FAISS, reason="faiss-cpu not installed")),
]


def brute_force(bank: torch.Tensor, queries: torch.Tensor, k: int):
    distances = torch.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1))
    values, indices = torch.sort(distances, dim=1)
    return values[:, :k], indices[:, :k]


@pytest.mark.parametrize("search", BACKENDS)
def test_nearest_neighbours_equal_a_brute_force_search(search):
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 7, generator=generator)
    queries = torch.randn(33, 7, generator=generator)
    distances, indices = nearest_neighbours(bank, queries, k=3, search=search)
    expected_d, expected_i = brute_force(bank, queries, 3)
    assert torch.equal(indices, expected_i)
    assert torch.allclose(distances, expected_d, atol=1e-4)


def test_patch_scores_are_nearest_distances_and_the_image_score_is_reweighted_as_in_the_paper():
    generator = torch.Generator().manual_seed(1)
    bank = MemoryBank(torch.randn(40, 5, generator=generator), None, (3, 4))
    features = torch.randn(2, 5, 3, 4, generator=generator)
    maps, plain = score_patches(bank, features, (12, 16), reweight=False, sigma=0)
    queries = to_patches(features)
    nearest, _ = brute_force(bank.features, queries, 1)
    patch = nearest[:, 0].view(2, 3, 4)
    assert torch.allclose(plain, patch.flatten(1).amax(1), atol=1e-5)
    assert maps.shape == (2, 12, 16)
    _, weighted = score_patches(bank, features, (12, 16), num_neighbors=4, reweight=True, sigma=0)
    for image in range(2):
        worst = int(patch[image].flatten().argmax())
        query = queries.view(2, 12, 5)[image, worst]
        m_star = int(brute_force(bank.features, query[None], 1)[1][0, 0])
        support = brute_force(bank.features, bank.features[m_star][None], 4)[1][0]
        distances = torch.linalg.vector_norm(bank.features[support] - query, dim=1)
        weight = 1 - torch.exp(distances[0]) / torch.exp(distances).sum()
        assert weighted[image].item() == pytest.approx((weight * plain[image]).item(), rel=1e-5)


def test_soft_weights_multiply_the_distance_to_the_matched_bank_patch():
    bank = MemoryBank(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([1.0, 3.0]), (1, 2))
    features = torch.tensor([[[[1.0, 9.0]], [[0.0, 0.0]]]])  # patches (1, 0) and (9, 0)
    _, scores = score_patches(bank, features, (2, 4), reweight=False, sigma=0)
    assert scores.item() == pytest.approx(3.0)  # patch (9, 0): distance 1 to (10, 0), weight 3


def test_greedy_coreset_picks_the_farthest_point_each_time():
    generator = torch.Generator().manual_seed(2)
    points = torch.randn(200, 6, generator=generator)
    chosen = greedy_coreset(points, 12, seed=5, projection_dim=0)
    assert len(set(chosen.tolist())) == 12
    for step in range(1, 12):
        nearest = torch.cdist(points, points[chosen[:step]]).min(1).values
        assert nearest[chosen[step]] == pytest.approx(nearest.max().item())


def test_greedy_coreset_covers_every_planted_cluster():
    centers = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0], [50.0, 300.0]])
    generator = torch.Generator().manual_seed(3)
    points = torch.cat([c + torch.randn(30, 2, generator=generator) for c in centers])
    chosen = greedy_coreset(points, 5, seed=0, projection_dim=0)
    assert sorted((chosen // 30).tolist()) == [0, 1, 2, 3, 4]


def test_greedy_coreset_only_picks_allowed_candidates_and_refuses_too_few():
    points = torch.randn(20, 3)
    allowed = torch.zeros(20, dtype=torch.bool)
    allowed[::4] = True
    assert set(greedy_coreset(points, 5, allowed=allowed).tolist()) == set(range(0, 20, 4))
    with pytest.raises(ValueError, match="coreset size 6"):
        greedy_coreset(points, 6, allowed=allowed)


def test_coreset_size_and_projection():
    assert coreset_size(1000, 0.1) == 100
    assert coreset_size(3, 0.01) == 1
    with pytest.raises(ValueError, match="ratio"):
        coreset_size(10, 0)
    wide = torch.randn(10, 300)
    assert random_projection(wide, 128, seed=0).shape == (10, 128)
    assert torch.equal(random_projection(wide, 128, seed=0), random_projection(wide, 128, seed=0))
    assert random_projection(torch.randn(10, 50), 128, seed=0).shape == (10, 50)


@pytest.mark.parametrize("method", ["lof", "knn"])
def test_softpatch_drops_planted_outlier_patches_and_keeps_the_rest(method):
    generator = torch.Generator().manual_seed(4)
    images, positions = 30, 6
    features = torch.randn(images, positions, 4, generator=generator) * 0.1
    planted = [(3, 0), (7, 2), (11, 5), (20, 4)]
    for image, position in planted:
        features[image, position] += 5.0
    scores = patch_outlier_scores(features, method, neighbors=5)
    keep = keep_mask(scores, drop_ratio=len(planted) / (images * positions))
    dropped = {(int(i), int(p)) for i, p in torch.nonzero(~keep)}
    assert dropped == set(planted)


def test_softpatch_needs_more_images_than_neighbours():
    with pytest.raises(ValueError, match="more than neighbors=6"):
        patch_outlier_scores(torch.randn(5, 2, 3), "lof", neighbors=6)


def test_memory_bank_save_and_load_round_trip_bit_for_bit(tmp_path):
    features = torch.randn(4, 8, 3, 3)
    for denoise in (False, True):
        config = MemoryBankConfig(coreset_ratio=0.5, outlier_neighbors=2)
        bank, summary = build_memory_bank(features, config, denoise=denoise, seed=1)
        bank.save(tmp_path / "bank.pt")
        loaded = MemoryBank.load(tmp_path / "bank.pt")
        assert torch.equal(loaded.features, bank.features)
        assert loaded.patch_shape == (3, 3)
        assert (loaded.weights is None) == (not denoise)
        if denoise:
            assert torch.equal(loaded.weights, bank.weights)
            assert summary["dropped_patches"] == round(0.15 * 36)
        assert summary["coreset_size"] == len(bank.features)


def test_memory_bank_load_names_a_file_that_is_not_a_bank(tmp_path):
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="x.pt: not a cdd-ray memory bank"):
        MemoryBank.load(tmp_path / "x.pt")


def test_patch_features_average_neighbourhoods_and_bring_level_3_to_level_2():
    levels = [torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 4, 4)]
    features = patch_features(levels)
    assert features.shape == (2, 9, 8, 8)
    pooled = torch.nn.functional.avg_pool2d(levels[1], 3, 1, 1)
    assert torch.allclose(features[:, :4], pooled)
    assert to_patches(features).shape == (128, 9)
    assert torch.equal(to_patches(features)[8 * 8 + 3], features[1, :, 0, 3])
