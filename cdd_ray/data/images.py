"""Decoding and validation of image and mask files, with errors that name the file.

Every image becomes 8-bit RGB (grayscale, RGBA, palette and 16-bit inputs are converted); every
mask becomes a boolean array, defect wherever a stored value is non-zero (masks that store 255, 1,
40 or class ids 1, 2, 3 as VisA's do, all read the same). An EXIF orientation tag is applied to
images and masks alike, so both come out as an image viewer shows them. Conversions depend on the
file's format only, never on what one image happens to contain: 16-bit data is divided by 65535,
floating-point data is taken as [0, 1], and 32-bit integer data (no fixed white level) is refused.

Example::

    rgb = read_image(Path("train/good/000.png"))        # (H, W, 3) uint8
    mask = read_mask(Path("ground_truth/x_mask.png"), rgb.shape[:2], image_path)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class BadImageError(ValueError):
    """An image or mask file cannot be used; the message names it."""


class MaskMismatchError(ValueError):
    """A mask does not fit its image; the message names both files."""


def _open(data: bytes, name: str) -> Image.Image:
    if not data:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        upright = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"{name}: not a readable image ({error})") from error
    upright.format = image.format  # the conversion of 16- and 32-bit data depends on it
    return upright


def _to_array(image: Image.Image, name: str) -> np.ndarray:
    """8-bit array in the image's own channels (1, 3 or 4); the scale follows the mode only."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image, dtype=np.float64)  # PNG stores at most 16 bits per sample
        return np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if image.mode == "I":
        raise BadImageError(
            f"{name}: 32-bit integer pixels have no fixed white level; save the image with 8 or 16 bits"
        )
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)  # floating point: [0, 1]
    return np.asarray(image)


def decode_image(data: bytes, name: str) -> np.ndarray:
    image = _open(data, name)
    if image.mode in ("RGB",):
        return np.asarray(image, dtype=np.uint8)
    if image.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "L", "1"):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    gray = _to_array(image, name)
    return np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray[..., :3]


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """True wherever the stored value is non-zero: 255, 1 and class ids all mark a defect. Palette
    masks are read by palette index (0 is background), colour masks by any non-zero channel."""
    image = _open(data, name)
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    if image.mode == "CMYK":
        image = image.convert("RGB")
    values = np.asarray(image)
    if values.ndim == 3:
        return values.any(axis=2)
    return values != 0


def read_image(path: Path) -> np.ndarray:
    return decode_image(Path(path).read_bytes(), str(path))


def read_mask(path: Path, shape: tuple[int, int], image_path: Path | str) -> np.ndarray:
    try:
        mask = decode_mask(Path(path).read_bytes(), str(path))
    except BadImageError as error:
        raise MaskMismatchError(f"{error} (mask of image {image_path})") from error
    if mask.shape != tuple(shape):
        raise MaskMismatchError(
            f"mask {path} has size {mask.shape[1]}x{mask.shape[0]} but its image {image_path} "
            f"has {shape[1]}x{shape[0]}"
        )
    return mask


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    return encode_png((mask > 0).astype(np.uint8) * 255)


def resize_image(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) >= 128


def decode_images(blobs: list[bytes], names: list[str], size: int, as_uint8: bool = False) -> np.ndarray:
    """PNG bytes to a float32 (N, 3, size, size) array in [0, 1], or (``as_uint8``) the same pixels as
    uint8 in [0, 255], a quarter of the memory; ``cdd_ray.data.tensors.to_float`` turns those into the
    float32 values of the first form."""
    out = np.empty((len(blobs), 3, size, size), dtype=np.uint8 if as_uint8 else np.float32)
    for index, (blob, name) in enumerate(zip(blobs, names, strict=True)):
        pixels = resize_image(decode_image(blob, name), size).transpose(2, 0, 1)
        out[index] = pixels if as_uint8 else pixels / 255.0
    return out


def decode_masks(blobs: list[bytes | None], names: list[str], size: int) -> np.ndarray:
    """PNG masks (None = all normal) to a uint8 (N, size, size) array of 0/1."""
    out = np.zeros((len(blobs), size, size), dtype=np.uint8)
    for index, (blob, name) in enumerate(zip(blobs, names, strict=True)):
        if blob is not None:
            out[index] = resize_mask(decode_mask(blob, name), size)
    return out
