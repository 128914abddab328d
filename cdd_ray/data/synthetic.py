"""The embedded synthetic benchmark: procedural textures and object scenes with exact defect masks.

Deterministic: every image is drawn from its own RNG seeded by (seed, category, split, index), so the
same settings always give the same pixels. Normal images vary in position, lighting, orientation
and texture phase; defects vary in size, place and strength (some are subtle on purpose, so that a
plain RD on clean data does not already score a perfect AUROC).

Categories and defect types:

- ``weave`` (texture): scratch, hole, stain, foreign
- ``granite`` (texture): scratch, hole, stain, foreign
- ``bolts`` (objects on a plate): scratch, stain, missing, misplaced
- ``pill`` (one object): hole, stain, missing, misplaced

Example::

    for sample in generate_category("weave", SyntheticConfig(image_size=64)):
        sample.image  # (H, W, 3) uint8;  sample.mask: (H, W) bool or None
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CATEGORIES = ("weave", "granite", "bolts", "pill")
DEFECTS = {
    "weave": ("scratch", "hole", "stain", "foreign"),
    "granite": ("scratch", "hole", "stain", "foreign"),
    "bolts": ("scratch", "stain", "missing", "misplaced"),
    "pill": ("hole", "stain", "missing", "misplaced"),
}
SPLIT_CODES = {"train": 0, "test": 1}


@dataclass
class SyntheticConfig:
    image_size: int = 128
    train_normal: int = 60
    test_normal: int = 50
    test_anomalous: int = 80
    seed: int = 0
    categories: tuple[str, ...] = CATEGORIES


@dataclass
class SyntheticSample:
    category: str
    split: str
    label: int
    defect_type: str
    name: str
    image: np.ndarray
    mask: np.ndarray | None


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(0.0, 1.0, size, endpoint=False)
    return np.meshgrid(axis, axis, indexing="xy")


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    return 1.0 + rng.uniform(0.05, 0.15) * ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle))


def _tint(gray: np.ndarray, color: np.ndarray) -> np.ndarray:
    return gray[..., None] * color[None, None, :]


def _weave(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    theta = np.deg2rad(rng.uniform(-6, 6))
    period = rng.uniform(0.07, 0.085)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    pattern = np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)) * np.sin(
        2 * np.pi * v / period + rng.uniform(0, 2 * np.pi)
    )
    gray = 0.5 + 0.22 * pattern + rng.normal(0, 0.03, (size, size))
    return _tint(gray, np.array([0.85, 0.75, 0.55]))


def _granite(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), size / 24)
    fine = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 1.0)
    gray = 0.5 + 0.12 * coarse / coarse.std() + 0.08 * fine / fine.std()
    return _tint(gray, np.array([0.7, 0.72, 0.78]))


def _disc(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


@dataclass
class Scene:
    """An image plus the parts an object defect can remove or move."""

    image: np.ndarray
    parts: list[np.ndarray]
    redraw: Callable[[np.ndarray, float, float], np.ndarray]
    part_centers: list[tuple[float, float]]
    background: np.ndarray


def _bolts(rng: np.random.Generator, size: int) -> Scene:
    x, y = _grid(size)
    plate = 0.35 + 0.05 * ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 2.0)
    background = _tint(plate, np.array([0.6, 0.65, 0.7]))
    offset = rng.uniform(-0.03, 0.03, 2)
    radius = rng.uniform(0.085, 0.1)
    centers = [(0.3 + offset[0] + 0.4 * i, 0.3 + offset[1] + 0.4 * j) for i in range(2) for j in range(2)]

    def draw(image: np.ndarray, cx: float, cy: float) -> np.ndarray:
        outer = _disc(x, y, cx, cy, radius)
        inner = _disc(x, y, cx, cy, radius * 0.45)
        shade = 0.75 + 0.2 * ((x - cx) - (y - cy)) / radius
        out = image.copy()
        out[outer] = _tint(shade, np.array([0.9, 0.88, 0.8]))[outer]
        out[inner] = np.array([0.25, 0.25, 0.28])
        return out

    image = background.copy()
    for cx, cy in centers:
        image = draw(image, cx, cy)
    parts = [_disc(x, y, cx, cy, radius + 1.5 / size) for cx, cy in centers]
    return Scene(image, parts, draw, centers, background)


def _pill(rng: np.random.Generator, size: int) -> Scene:
    x, y = _grid(size)
    background = _tint(0.2 + 0.03 * rng.normal(0, 1, (size, size)), np.array([0.5, 0.55, 0.6]))
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05, 2)
    angle = rng.uniform(-0.3, 0.3)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    body = (u / 0.33) ** 2 + (v / 0.18) ** 2 <= 1.0
    image = background.copy()
    shade = 0.85 - 0.25 * np.clip((u / 0.33) ** 2 + (v / 0.18) ** 2, 0, 1)
    image[body] = _tint(shade, np.array([0.95, 0.92, 0.85]))[body]
    mark_r = 0.045

    def draw(img: np.ndarray, mx: float, my: float) -> np.ndarray:
        out = img.copy()
        out[_disc(x, y, mx, my, mark_r)] = np.array([0.7, 0.2, 0.2])
        return out

    mark = (cx + 0.15 * np.cos(angle), cy + 0.15 * np.sin(angle))
    plain = image.copy()
    image = draw(image, *mark)
    return Scene(image, [_disc(x, y, mark[0], mark[1], mark_r + 1.5 / size)], draw, [mark], plain)


TEXTURES = {"weave": _weave, "granite": _granite}
SCENES = {"bolts": _bolts, "pill": _pill}


def _blob(rng: np.random.Generator, size: int, scale: tuple[float, float]) -> np.ndarray:
    x, y = _grid(size)
    cx, cy = rng.uniform(0.2, 0.8, 2)
    a, b = rng.uniform(*scale, 2)
    angle = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def bent_line(
    rng: np.random.Generator,
    size: int,
    length: tuple[float, float],
    bend: float,
    density: int,
    start: np.ndarray | None = None,
    direction: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Points (x, y) in image-width units (float arrays of ``density * size``) along a slightly bent
    line: a random start in [0.15, 0.85]^2, direction, length drawn from ``length`` and a sine bend
    of amplitude up to ``bend``. Draws from ``rng`` in that order; a ``start`` (x, y) or a
    ``direction`` (radians) given is used instead of its draw."""
    start = rng.uniform(0.15, 0.85, 2) if start is None else start
    direction = rng.uniform(0, 2 * np.pi) if direction is None else direction
    extent = rng.uniform(*length)
    t = np.linspace(0, 1, density * size)
    offset = rng.uniform(-bend, bend) * np.sin(np.pi * t)
    px = start[0] + extent * t * np.cos(direction) - offset * np.sin(direction)
    py = start[1] + extent * t * np.sin(direction) + offset * np.cos(direction)
    return px, py


def _scratch(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    px, py = bent_line(rng, size, (0.15, 0.4), 0.05, 4)
    mask = np.zeros((size, size), bool)
    cols = np.clip((px * size).astype(int), 0, size - 1)
    rows = np.clip((py * size).astype(int), 0, size - 1)
    mask[rows, cols] = True
    if rng.random() < 0.5:
        mask = ndimage.binary_dilation(mask)
    value = rng.choice([0.1, 0.95])
    strength = rng.uniform(0.5, 0.9)
    out = image.copy()
    out[mask] = (1 - strength) * out[mask] + strength * value
    return out, mask


def _hole(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = _blob(rng, image.shape[0], (0.03, 0.07))
    out = image.copy()
    out[mask] *= rng.uniform(0.15, 0.45)
    return out, mask


def _stain(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = _blob(rng, image.shape[0], (0.05, 0.12))
    shift = rng.uniform(-1, 1, 3)
    shift *= rng.uniform(0.06, 0.15) / np.abs(shift).max()
    out = image.copy()
    out[mask] += shift
    return out, mask


def _foreign(rng: np.random.Generator, image: np.ndarray, category: str) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    other = _granite if category == "weave" else _weave
    mask = _blob(rng, size, (0.05, 0.11))
    out = image.copy()
    out[mask] = other(rng, size)[mask]
    return out, mask


def _changed(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The exact mask of an object defect: every pixel it altered."""
    return np.abs(image - reference).max(axis=2) > 1e-6


def _missing(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    index = int(rng.integers(len(scene.parts)))
    out = scene.image.copy()
    out[scene.parts[index]] = scene.background[scene.parts[index]]
    return out, _changed(out, scene.image)


def _misplaced(rng: np.random.Generator, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    index = int(rng.integers(len(scene.parts)))
    old = scene.parts[index]
    out = scene.image.copy()
    out[old] = scene.background[old]
    cx, cy = scene.part_centers[index]
    angle = rng.uniform(0, 2 * np.pi)
    dx, dy = rng.uniform(0.06, 0.12) * np.cos(angle), rng.uniform(0.06, 0.12) * np.sin(angle)
    moved = scene.redraw(out, cx + dx, cy + dy)
    return moved, _changed(moved, scene.image)


def _render(
    category: str, rng: np.random.Generator, size: int, defect: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    light = _lighting(rng, size)[..., None]
    if category in TEXTURES:
        image = TEXTURES[category](rng, size)
        scene = None
    else:
        scene = SCENES[category](rng, size)
        image = scene.image
    mask = None
    if defect in ("missing", "misplaced"):
        image, mask = (_missing if defect == "missing" else _misplaced)(rng, scene)
    elif defect == "foreign":
        image, mask = _foreign(rng, image, category)
    elif defect is not None:
        image, mask = {"scratch": _scratch, "hole": _hole, "stain": _stain}[defect](rng, image)
    pixels = np.clip(image * light, 0.0, 1.0)
    return (pixels * 255 + 0.5).astype(np.uint8), mask


def generate_category(category: str, config: SyntheticConfig) -> Iterator[SyntheticSample]:
    if category not in DEFECTS:
        raise ValueError(f"unknown synthetic category {category!r}; choose from {CATEGORIES}")
    cat_code = CATEGORIES.index(category)
    plan = [("train", "good", i) for i in range(config.train_normal)]
    plan += [("test", "good", i) for i in range(config.test_normal)]
    defects = DEFECTS[category]
    plan += [("test", defects[i % len(defects)], i) for i in range(config.test_anomalous)]
    for split, defect_type, index in plan:
        label = int(defect_type != "good")
        rng = np.random.default_rng([config.seed, cat_code, SPLIT_CODES[split], label, index])
        image, mask = _render(category, rng, config.image_size, None if label == 0 else defect_type)
        yield SyntheticSample(category, split, label, defect_type, f"{index:03d}", image, mask)
