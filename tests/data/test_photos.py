"""The photo benchmark: real photographs, exact masks, an MVTec tree that prepares like a user's data."""

import numpy as np
import pytest
from PIL import Image

from cdd_ray.cli import main
from cdd_ray.data.photos import DEFECTS, PHOTOS, PhotoBenchmarkConfig, draw_defect, load_photo, normal_crop
from cdd_ray.data.prepare import prepare

SMALL = PhotoBenchmarkConfig(image_size=32, train_normal=4, test_normal=2, test_anomalous=8)


def test_the_reserved_photographs_are_refused():
    for name in ("brick", "grass", "gravel"):
        with pytest.raises(ValueError, match="reserved for the independent check"):
            load_photo(name)
    assert not {p.name for p in PHOTOS.values()} & {"brick", "grass", "gravel"}


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_changes_exactly_its_mask_and_visibly(defect):
    rng = np.random.default_rng(3)
    image = normal_crop(load_photo("moon"), PHOTOS["lunar"], rng, 64)
    foreign = np.random.default_rng(4).random((128, 128, 3))
    out, mask = draw_defect(defect, rng, image, foreign)
    changed = np.abs(out - image).max(axis=2) > 0
    assert mask.any() and not (changed & ~mask).any()  # nothing outside the mask moved
    assert np.abs(out - image)[mask].mean() >= 0.06


def test_the_tree_prepares_through_the_mvtec_reader_and_is_deterministic(tmp_path, capsys):
    assert (
        main(
            ["photo-benchmark", "--out", str(tmp_path / "tree"), "--category", "tissue", "--image-size", "32"]
        )
        == 0
    )
    assert "next: cdd-ray prepare mvtec" in capsys.readouterr().out
    base = tmp_path / "tree" / "tissue"
    assert {p.name for p in (base / "test").iterdir()} == {"good", *DEFECTS}
    mask = np.asarray(Image.open(base / "ground_truth" / "stain" / "001_mask.png"))
    assert mask.any()
    summary = prepare("mvtec", tmp_path / "tree", tmp_path / "store", noise_ratio=0.1, overlap=True)
    assert (
        summary["counts"]["tissue/train/anomalous"] == 8 and summary["counts"]["tissue/test/anomalous"] == 80
    )
    from cdd_ray.data.photos import write_photo_benchmark

    write_photo_benchmark(tmp_path / "again", PhotoBenchmarkConfig(image_size=32, categories=("tissue",)))
    same = tmp_path / "again" / "tissue" / "test" / "hole" / "002.png"
    assert (base / "test" / "hole" / "002.png").read_bytes() == same.read_bytes()
    with pytest.raises(FileExistsError):
        write_photo_benchmark(tmp_path / "again", SMALL)
