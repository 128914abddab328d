"""Image tensors as the models take them."""

from __future__ import annotations

import torch


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1]: uint8 (N, 3, S, S) in [0, 255] is divided by 255 in float32,
    which gives exactly the values ``decode_images`` writes when decoding straight to float32 (for
    all 256 values x, float32(x / 255) is the float32 nearest to x / 255 either way); float
    input is returned unchanged. Works on any device; the division runs where ``images`` lies."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images
