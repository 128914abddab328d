"""A realistic benchmark from real photographs: crops of textured photos with drawn defects, exact masks.

The synthetic benchmark is too easy on plain RD to tell robust methods apart; real photographs are
not. This module cuts textured photographs that scikit-image ships (no download) into crops and
draws defects on some of them, then writes the result in the MVTec AD layout, so that it goes
through ``cdd-ray prepare mvtec`` like a user's data::

    <out>/<category>/train/good/000.png
    <out>/<category>/test/good/000.png, test/<defect>/000.png
    <out>/<category>/ground_truth/<defect>/000_mask.png

Categories (photograph, crop size in its pixels): ``tissue`` (immunohistochemistry, 160),
``lunar`` (moon, 160), ``retina`` (retina, 320, inside the fundus disk), ``deepfield``
(hubble_deep_field, 200). scikit-image's brick, grass and gravel are reserved for an independent
check of the product and are refused here.

Normal crops vary in position, a rotation by a multiple of 90 degrees, a mirror, brightness and
contrast (+-6 %). Defects (one per anomalous image, cycled): ``scratch`` (a thin bent line, darker or
lighter), ``stain`` (an irregular blob with a colour shift), ``hole`` (an irregular blob smoothed and
pulled towards black, or towards white on dark stock: texture lost), ``foreign`` (an irregular blob
filled with another photograph). Each mask is exactly the set of pixels the defect was drawn on; a
defect leaves every other pixel untouched, and changes the masked ones by at least ``MIN_CHANGE``
on average.

Where defects lie (``defects_at``, one of ``PLACEMENTS``): ``middle`` (the default, the benchmark
every figure in BENCHMARKS.md uses unless it says otherwise): a blob's centre and a scratch's start
in the middle 60 % (70 % for scratches) of each side; ``edge``: next to a side of the image, drawn
uniformly among the four, a blob's centre or a scratch's start ``EDGE_BAND`` (2-12 %) of the side
away from it, a scratch running along it (within 25 degrees). At 128 px that puts on average
0.8-0.9 of a defect's pixels within 16 px of the border and 0.4-0.6 within 8 px, the band where a
student's zero padding acts (BENCHMARKS.md "Where RD's false alarms sit"); a scratch that starts
near a corner can run inwards. The normal images are the same in both.

Deterministic: every crop has its own RNG seeded by (seed, category, split, index).

Example::

    write_photo_benchmark(Path("data/photos"), PhotoBenchmarkConfig(categories=("tissue", "lunar")))
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cdd_ray.data.images import encode_mask, encode_png
from cdd_ray.data.synthetic import bent_line


@dataclass(frozen=True)
class Photo:
    name: str  # scikit-image's name
    crop_size: int  # crop side in the photograph's pixels, before resizing to image_size
    region: tuple[int, int] | None = None  # (first, last) row and column crops may cover


PHOTOS = {
    "tissue": Photo("immunohistochemistry", 160),
    "lunar": Photo("moon", 160),
    "retina": Photo("retina", 320, (300, 1110)),
    "deepfield": Photo("hubble_deep_field", 200),
}
CATEGORIES = tuple(PHOTOS)
DEFECTS = ("scratch", "stain", "hole", "foreign")
FOREIGN_PHOTO = "coffee"
RESERVED = ("brick", "grass", "gravel")  # the independent check's photographs: never used here
SPLIT_CODES = {"train": 0, "test": 1}
PLACEMENTS = ("middle", "edge")
EDGE_BAND = (0.02, 0.12)  # edge: a blob centre's or scratch start's distance from its side (share)


def check_placement(at: str) -> None:
    """Raises ValueError naming ``defects_at`` unless ``at`` is one of PLACEMENTS."""
    if at not in PLACEMENTS:
        raise ValueError(f"defects_at must be one of {PLACEMENTS}, got {at!r}")


def edge_point(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(x, y) in image-width units next to a side drawn uniformly (0 left, 1 right, 2 top, 3
    bottom): ``EDGE_BAND`` away from it, uniform in [0.05, 0.95] along it; and that side."""
    side = int(rng.integers(4))
    depth = rng.uniform(*EDGE_BAND)
    along = rng.uniform(0.05, 0.95)
    across = depth if side in (0, 2) else 1.0 - depth
    point = np.array([across, along]) if side < 2 else np.array([along, across])
    return point, side


def _centre(rng: np.random.Generator, at: str) -> np.ndarray:
    if at == "edge":
        return edge_point(rng)[0]
    return rng.uniform(0.2, 0.8, 2)


@dataclass
class PhotoBenchmarkConfig:
    image_size: int = 128  # written size (pixels); crops are resized to it
    train_normal: int = 80
    test_normal: int = 50
    test_anomalous: int = 80
    seed: int = 0
    categories: tuple[str, ...] = CATEGORIES
    defects_at: str = "middle"  # one of PLACEMENTS (module docstring)


def load_photo(name: str) -> np.ndarray:
    """A scikit-image photograph as float RGB (H, W, 3) in [0, 1]; the reserved ones are refused."""
    if name in RESERVED:
        raise ValueError(f"photograph {name!r} is reserved for the independent check; not used here")
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError("the photo benchmark needs scikit-image (pip install scikit-image)") from error
    pixels = np.asarray(getattr(skimage.data, name)(), dtype=np.float64) / 255.0
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return pixels[..., :3]


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


def normal_crop(pixels: np.ndarray, photo: Photo, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop, rotated by k * 90 degrees, maybe mirrored, with +-6 % brightness and contrast."""
    if photo.region is not None:
        first, last = photo.region
        pixels = pixels[first:last, first:last]
    height, width = pixels.shape[:2]
    crop = photo.crop_size
    if min(height, width) < crop:
        raise ValueError(f"{photo.name}: {width}x{height} pixels is smaller than its crop size {crop}")
    top = int(rng.integers(0, height - crop + 1))
    left = int(rng.integers(0, width - crop + 1))
    pixels = np.rot90(pixels[top : top + crop, left : left + crop], int(rng.integers(4)))
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    pixels = _resize(pixels, size)
    mean = pixels.mean()
    return np.clip((pixels - mean) * rng.uniform(0.94, 1.06) + mean * rng.uniform(0.94, 1.06), 0, 1)


def irregular_blob(
    rng: np.random.Generator, size: int, radius: tuple[float, float], at: str = "middle"
) -> np.ndarray:
    """A connected blob: an ellipse whose edge is bent by smooth noise; radius as a share of size,
    its centre placed as ``at`` (one of PLACEMENTS) says."""
    y, x = np.mgrid[0:size, 0:size] / size
    cx, cy = _centre(rng, at)
    a, b = rng.uniform(*radius, 2)
    angle = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), size / 16)
    field = (u / a) ** 2 + (v / b) ** 2 + 0.6 * noise / max(noise.std(), 1e-9)
    blob = field <= 1.0
    labels, count = ndimage.label(blob)
    if count == 0:  # the noise ate the ellipse: fall back to the ellipse itself
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    largest = 1 + int(np.argmax(ndimage.sum(blob, labels, range(1, count + 1))))
    return labels == largest


def _scratch(
    rng: np.random.Generator, image: np.ndarray, _: np.ndarray, at: str
) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    start = direction = None  # middle: bent_line draws both
    if at == "edge":  # along the side: 0 or pi (left/right sides: +-pi/2), within 25 degrees
        start, side = edge_point(rng)
        direction = (np.pi / 2 if side < 2 else 0.0) + np.pi * int(rng.integers(2))
        direction += rng.uniform(-1, 1) * np.radians(25)
    px, py = bent_line(rng, size, (0.2, 0.45), 0.08, 6, start=start, direction=direction)
    inside = (px >= 0) & (px < 1) & (py >= 0) & (py < 1)
    mask = np.zeros((size, size), bool)
    mask[(py[inside] * size).astype(int), (px[inside] * size).astype(int)] = True
    if rng.random() < 0.6:
        mask = ndimage.binary_dilation(mask)
    target = 0.05 if image[mask].mean() > 0.5 else 0.95
    out = image.copy()
    out[mask] += rng.uniform(0.45, 0.8) * (target - out[mask])
    return out, mask


def _stain(
    rng: np.random.Generator, image: np.ndarray, _: np.ndarray, at: str
) -> tuple[np.ndarray, np.ndarray]:
    mask = irregular_blob(rng, image.shape[0], (0.06, 0.14), at)
    shift = rng.uniform(-1, 1, 3)
    shift *= rng.uniform(0.08, 0.18) / np.abs(shift).max()
    out = image.copy()
    out[mask] += shift
    return out, mask


def _hole(
    rng: np.random.Generator, image: np.ndarray, _: np.ndarray, at: str
) -> tuple[np.ndarray, np.ndarray]:
    mask = irregular_blob(rng, image.shape[0], (0.04, 0.09), at)
    smooth = ndimage.gaussian_filter(image, sigma=(3, 3, 0))
    behind = 0.05 if image[mask].mean() > 0.35 else 0.9  # dark hole, or backlight through dark stock
    out = image.copy()
    out[mask] = smooth[mask] + rng.uniform(0.5, 0.8) * (behind - smooth[mask])
    return out, mask


def _foreign(
    rng: np.random.Generator, image: np.ndarray, other: np.ndarray, at: str
) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    mask = irregular_blob(rng, size, (0.05, 0.11), at)
    top = int(rng.integers(0, other.shape[0] - size + 1))
    left = int(rng.integers(0, other.shape[1] - size + 1))
    out = image.copy()
    out[mask] = other[top : top + size, left : left + size][mask]
    return out, mask


DRAW = {"scratch": _scratch, "stain": _stain, "hole": _hole, "foreign": _foreign}
MIN_CHANGE = 0.06  # mean absolute change inside the mask (of 1), so that no defect is invisible
ATTEMPTS = 20
# edge: a defect whose mask has fewer pixels than this share of the image's side (a blob mostly
# outside it) is drawn again: 16.4 pixels at 128 px. In pixels per side, not a share of the area,
# so that a scratch (a line: its area grows with the side, not its square) passes at every size.
MIN_EDGE_PIXELS_PER_SIDE = 0.128


def draw_defect(
    defect: str, rng: np.random.Generator, image: np.ndarray, foreign: np.ndarray, at: str = "middle"
) -> tuple[np.ndarray, np.ndarray]:
    """(image with the defect, its exact mask); ``image`` is float RGB (S, S, 3) in [0, 1]; ``at``
    (one of PLACEMENTS) says where the defect lies (module docstring).

    A draw that changes the masked pixels by less than ``MIN_CHANGE`` on average (a dark hole on a
    dark sky), or at the edge has fewer than ``MIN_EDGE_PIXELS_PER_SIDE`` x S pixels, is drawn
    again; raises RuntimeError after ``ATTEMPTS`` draws, ValueError for an unknown defect or
    placement."""
    if defect not in DRAW:
        raise ValueError(f"unknown defect {defect!r}; choose from {DEFECTS}")
    check_placement(at)
    for _ in range(ATTEMPTS):
        out, mask = DRAW[defect](rng, image, foreign, at)
        out = np.clip(out, 0.0, 1.0)
        large_enough = at != "edge" or mask.sum() >= MIN_EDGE_PIXELS_PER_SIDE * mask.shape[0]
        if mask.any() and large_enough and np.abs(out - image)[mask].mean() >= MIN_CHANGE:
            return out, mask
    reasons = "a visible change" + (" and enough pixels inside the image" if at == "edge" else "")
    raise RuntimeError(f"no {defect} with {reasons} after {ATTEMPTS} draws (defects_at={at!r})")


def _quantize(pixels: np.ndarray) -> np.ndarray:
    return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)


def _plan(config: PhotoBenchmarkConfig) -> list[tuple[str, str, int]]:
    plan = [("train", "good", i) for i in range(config.train_normal)]
    plan += [("test", "good", i) for i in range(config.test_normal)]
    return plan + [("test", DEFECTS[i % len(DEFECTS)], i) for i in range(config.test_anomalous)]


def _write_category(base: Path, category: str, config: PhotoBenchmarkConfig) -> dict[str, int]:
    photo = PHOTOS[category]
    pixels = load_photo(photo.name)
    foreign = _resize(load_photo(FOREIGN_PHOTO)[:, 100:500], 2 * config.image_size)
    code = CATEGORIES.index(category)
    counts: dict[str, int] = {}
    for split, defect, index in _plan(config):
        label = int(defect != "good")
        rng = np.random.default_rng([config.seed, code, SPLIT_CODES[split], label, index])
        image = normal_crop(pixels, photo, rng, config.image_size)
        name = f"{index:03d}"
        folder = base / category / split / defect
        folder.mkdir(parents=True, exist_ok=True)
        if label:
            image, mask = draw_defect(defect, rng, image, foreign, config.defects_at)
            masks = base / category / "ground_truth" / defect
            masks.mkdir(parents=True, exist_ok=True)
            (masks / f"{name}_mask.png").write_bytes(encode_mask(mask))
        (folder / f"{name}.png").write_bytes(encode_png(_quantize(image)))
        counts[f"{split}/{defect}"] = counts.get(f"{split}/{defect}", 0) + 1
    return counts


def write_photo_benchmark(out: Path, config: PhotoBenchmarkConfig | None = None) -> dict[str, dict[str, int]]:
    """Write the benchmark as an MVTec AD tree at ``out``; returns image counts per category.

    The tree is written beside ``out`` under a temporary name and renamed when complete, so an
    interrupted run leaves nothing half-written. Raises FileExistsError when ``out`` exists (also
    when another process writes into it while this one writes; an empty folder created meanwhile
    is replaced) and ValueError for an unknown category or ``defects_at``."""
    config = config or PhotoBenchmarkConfig()
    unknown = sorted(set(config.categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown photo categories {unknown}; choose from {CATEGORIES}")
    check_placement(config.defects_at)  # before anything is written
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; the photo benchmark is written to a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts = {category: _write_category(staging, category, config) for category in config.categories}
        try:
            staging.rename(out)
        except OSError as error:  # another process wrote ``out`` meanwhile (a non-empty folder)
            if out.exists():
                raise FileExistsError(
                    f"{out} was created by another process while this one wrote the photo benchmark; "
                    "it is left as that process wrote it"
                ) from error
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts
