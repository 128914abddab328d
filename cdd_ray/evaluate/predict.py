"""``cdd-ray predict``: image scores and anomaly-map PNGs for new images, in-process (no Ray needed).

Example::

    rows = predict_images(checkpoint_dir, [Path("part.png")], Path("predictions"))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cdd_ray.data.images import read_image, resize_image
from cdd_ray.data.store import write_json
from cdd_ray.evaluate.report import save_map_png
from cdd_ray.evaluate.scoring import load_detector
from cdd_ray.models.detector import score_in_batches


def predict_images(checkpoint_dir: Path, images: list[Path], out: Path) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detector, config = load_detector(checkpoint_dir, device)
    size = config.data.image_size
    pixels = np.stack([resize_image(read_image(p), size).transpose(2, 0, 1) / 255.0 for p in images])
    maps, scores = score_in_batches(detector, torch.from_numpy(pixels.astype(np.float32)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vmax = float(maps.max())
    rows = []
    for path, anomaly_map, score in zip(images, maps.numpy(), scores.tolist(), strict=True):
        target = out / f"{path.stem}_map.png"
        save_map_png(target, anomaly_map, vmax)
        rows.append({"image": str(path), "score": score, "map": str(target)})
    write_json(out / "scores.json", rows)
    return rows
