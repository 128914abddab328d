"""PatchCore's memory bank: nearest-neighbour search, patch scores, the reweighted image score.

A ``MemoryBank`` holds the coreset's patch features (M, D), optional per-patch soft weights
(SoftPatch) and the patch grid (h, w) it was built on. Scoring a test image (Roth et al., CVPR 2022,
equations 6-7):

- each patch's score is the Euclidean distance to its nearest bank patch (SoftPatch: times that bank
  patch's weight);
- the image score is the largest patch score s*, reweighted by
  w = 1 - exp(||m_test* - m*||) / sum over the b nearest bank patches m of m* of exp(||m_test* - m||),
  which lowers the score when m* sits in a dense part of the bank (anomalib computes the same
  ratio as a softmax); without reweighting the image score is s*;
- the map is the patch scores upsampled bilinearly to the image and blurred (Gaussian, sigma 4).

Search backends (``search``): ``torch`` (exact, by matrix products in chunks, on any device; it also
exports to ONNX) or ``faiss`` (exact IndexFlatL2 on CPU, from the optional faiss-cpu package).
Both give the same neighbours up to ties and float32 rounding.

Example::

    bank = MemoryBank(features=coreset, weights=None, patch_shape=(16, 16))
    maps, scores = score_patches(bank, patch_features(teacher(images)), image_size=(128, 128))
    bank.save(run_dir / "memory_bank.pt"); MemoryBank.load(run_dir / "memory_bank.pt")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cdd_ray.models.anomaly_map import gaussian_blur
from cdd_ray.models.patchcore.features import to_patches

SEARCH_BACKENDS = ("torch", "faiss")
BANK_FORMAT_VERSION = 1
QUERY_CHUNK = 4096


@dataclass
class MemoryBank:
    features: torch.Tensor  # (M, D) float32
    weights: torch.Tensor | None  # (M,) soft weights (SoftPatch) or None
    patch_shape: tuple[int, int]

    def save(self, path: Path) -> None:
        """torch.save under a temporary name, then rename: a reader never sees half a bank."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save(
            {
                "format_version": BANK_FORMAT_VERSION,
                "features": self.features.detach().cpu().contiguous(),
                "weights": None if self.weights is None else self.weights.detach().cpu().contiguous(),
                "patch_shape": list(self.patch_shape),
            },
            temporary,
        )
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> MemoryBank:
        """Raises ValueError naming the file when it is not a memory bank of this format."""
        payload = torch.load(Path(path), map_location=device, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format_version") != BANK_FORMAT_VERSION:
            raise ValueError(f"{path}: not a cdd-ray memory bank of format {BANK_FORMAT_VERSION}")
        return cls(payload["features"], payload["weights"], tuple(payload["patch_shape"]))

    def to(self, device: torch.device | str) -> MemoryBank:
        weights = None if self.weights is None else self.weights.to(device)
        return MemoryBank(self.features.to(device), weights, self.patch_shape)


def nearest_neighbours(
    bank: torch.Tensor, queries: torch.Tensor, k: int = 1, search: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (Q, k) and indices (Q, k) of each query's k nearest rows of ``bank``."""
    if search not in SEARCH_BACKENDS:
        raise ValueError(f"search must be one of {SEARCH_BACKENDS}, got {search!r}")
    k = min(k, bank.shape[0])
    if search == "faiss":
        return _faiss_search(bank, queries, k)
    bank_norms = (bank * bank).sum(1)

    def search_block(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # |q - b|^2 = |q|^2 + |b|^2 - 2 q.b: one matrix product (PatchCore's and anomalib's way),
        # which also exports to ONNX, unlike torch.cdist
        squared = (block * block).sum(1, keepdim=True) + bank_norms[None, :] - 2.0 * block @ bank.T
        values, index = torch.topk(squared, k, dim=1, largest=False)
        return values.clamp_min(0).sqrt(), index

    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return search_block(queries)  # one block: a loop would be fixed to the example's size
    # chunks bound the memory of the distance matrix
    found = [
        search_block(queries[start : start + QUERY_CHUNK]) for start in range(0, len(queries), QUERY_CHUNK)
    ]
    return torch.cat([d for d, _ in found]), torch.cat([i for _, i in found])


def _faiss_search(bank: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss
    except ImportError as error:
        raise ImportError("memory_bank.search=faiss needs the faiss-cpu package") from error
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.detach().float().cpu().contiguous().numpy())
    squared, found = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
    device = queries.device
    return torch.from_numpy(squared).clamp_min(0).sqrt().to(device), torch.from_numpy(found).to(device)


def score_patches(
    bank: MemoryBank,
    features: torch.Tensor,
    image_size: tuple[int, int],
    num_neighbors: int = 9,
    reweight: bool = True,
    sigma: float = 4.0,
    search: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (B, H, W) and image scores (B,) for patch features (B, D, h, w)."""
    _, dim, height, width = features.shape
    if (height, width) != tuple(bank.patch_shape):
        raise ValueError(f"patch grid {(height, width)} differs from the bank's {tuple(bank.patch_shape)}")
    queries = to_patches(features)
    distance, index = nearest_neighbours(bank.features, queries, 1, search)
    patch_scores = distance[:, 0]
    if bank.weights is not None:
        patch_scores = patch_scores * bank.weights[index[:, 0]]
    # shapes by -1, never by the batch size: a traced or exported graph takes any batch
    patch_scores = patch_scores.view(-1, height, width)
    image_scores = patch_scores.flatten(1).amax(1)
    if reweight:
        image_scores = image_scores * _reweighting(
            bank,
            queries.view(-1, height * width, dim),
            patch_scores,
            index[:, 0].view(-1, height * width),
            num_neighbors,
            search,
        )
    maps = F.interpolate(patch_scores.unsqueeze(1), size=image_size, mode="bilinear", align_corners=False)
    return gaussian_blur(maps.squeeze(1), sigma), image_scores


def _reweighting(
    bank: MemoryBank,
    queries: torch.Tensor,
    patch_scores: torch.Tensor,
    nearest: torch.Tensor,
    num_neighbors: int,
    search: str,
) -> torch.Tensor:
    """w of equation 7 for the most anomalous patch of each image: 1 - softmax(distances)[m*]."""
    worst = patch_scores.flatten(1).argmax(1, keepdim=True)  # (B, 1)
    worst_features = queries.gather(1, worst[:, :, None].expand(-1, 1, queries.shape[2]))[:, 0]  # (B, D)
    bank_nearest = nearest.gather(1, worst)[:, 0]  # (B,) index of m*
    _, support = nearest_neighbours(bank.features, bank.features[bank_nearest], num_neighbors, search)
    # support[:, 0] is m* itself (distance 0 to itself), the rest its nearest bank neighbours
    distances = torch.linalg.vector_norm(bank.features[support] - worst_features[:, None, :], dim=2)
    return 1.0 - torch.softmax(distances, dim=1)[:, 0]
