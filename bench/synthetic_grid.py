"""Writes docs/synthetic_grid.png: per category, two normal images then one image per defect type,
with the defect's mask outlined in red underneath.

Run: .venv/bin/python bench/synthetic_grid.py
"""

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from cdd_ray.data.synthetic import CATEGORIES, DEFECTS, SyntheticConfig, generate_category


def outlined(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    picture = image.copy()
    if mask is not None:
        picture[mask & ~ndimage.binary_erosion(mask)] = (255, 0, 0)
    return picture


def main(out: Path = Path("docs/synthetic_grid.png")) -> None:
    config = SyntheticConfig(train_normal=2, test_normal=0, test_anomalous=4)
    rows = []
    for category in CATEGORIES:
        samples = list(generate_category(category, config))
        normals = [s.image for s in samples if not s.label]
        defects = {s.defect_type: s for s in samples if s.label}
        tops = normals + [defects[d].image for d in DEFECTS[category]]
        bottoms = normals + [outlined(defects[d].image, defects[d].mask) for d in DEFECTS[category]]
        rows += [np.concatenate(tops, 1), np.concatenate(bottoms, 1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, 0)).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
