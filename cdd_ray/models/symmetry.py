"""The symmetries of a square image that augmentation uses, and their inverses. No Ray.

A symmetry is (flipped dims, transposed): the image is flipped along those dims, then transposed
(H and W swapped). Groups (one of ``GROUPS``):

- ``none``: the identity alone;
- ``flips``: identity, horizontal flip, vertical flip, both (the 180-degree rotation);
- ``d4``: each of the four flips with and without the transpose, the dihedral group of order 8
  (all symmetries of a square; needs H == W).

Example::

    for symmetry in group_elements("flips"):
        maps = undo(detector_maps(apply(images, symmetry)), symmetry)   # back in the input's frame
"""

from __future__ import annotations

import torch

GROUPS = ("none", "flips", "d4")
Symmetry = tuple[tuple[int, ...], bool]
_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def group_elements(group: str) -> list[Symmetry]:
    """The elements of ``group``, the identity first. Raises ValueError for an unknown group."""
    if group not in GROUPS:
        raise ValueError(f"symmetry group must be one of {GROUPS}, got {group!r}")
    if group == "none":
        return [((), False)]
    flips = [(dims, False) for dims in _FLIPS]
    return flips if group == "flips" else flips + [(dims, True) for dims in _FLIPS]


def check_shape(group: str, images: torch.Tensor, setting: str) -> None:
    """ValueError naming ``setting`` when ``group`` (d4: it transposes) meets non-square images."""
    if group == "d4" and images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{setting}=d4 needs square images, got {tuple(images.shape[-2:])}")


def apply(images: torch.Tensor, symmetry: Symmetry) -> torch.Tensor:
    """``images`` (..., H, W) flipped along the symmetry's dims, then transposed if it says so."""
    dims, transposed = symmetry
    out = images.flip(dims) if dims else images
    return out.transpose(-1, -2) if transposed else out


def undo(images: torch.Tensor, symmetry: Symmetry) -> torch.Tensor:
    """The inverse of ``apply``: ``undo(apply(x, s), s)`` is ``x``."""
    dims, transposed = symmetry
    out = images.transpose(-1, -2) if transposed else images
    return out.flip(dims) if dims else out
