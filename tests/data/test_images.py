"""Decoding: training images kept as uint8 turn into exactly the float32 values of the float path."""

import numpy as np
import torch

from cdd_ray.data.images import decode_images, encode_png
from cdd_ray.data.tensors import to_float


def test_uint8_images_become_exactly_the_float_decoding():
    rng = np.random.default_rng(0)
    every_value = np.arange(256, dtype=np.uint8).reshape(16, 16)
    noise = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)  # resized: PIL's uint8 output
    pictures = [np.repeat(every_value[..., None], 3, axis=2), noise]
    blobs, names = [encode_png(p) for p in pictures], ["a.png", "b.png"]
    as_float = decode_images(blobs, names, 16)
    as_uint8 = decode_images(blobs, names, 16, as_uint8=True)
    assert as_float.dtype == np.float32 and as_uint8.dtype == np.uint8
    assert as_uint8.nbytes * 4 == as_float.nbytes
    assert torch.equal(to_float(torch.from_numpy(as_uint8)), torch.from_numpy(as_float))
    # float input passes through untouched
    assert to_float(torch.from_numpy(as_float)).data_ptr() == torch.from_numpy(as_float).data_ptr()
