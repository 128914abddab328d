"""The photo benchmark: real photographs, exact masks, an MVTec tree that prepares like a user's data."""

import numpy as np
import pytest
from PIL import Image

from cdd_ray.cli import main
from cdd_ray.data.photos import (
    DEFECTS,
    EDGE_BAND,
    MIN_EDGE_PIXELS_PER_SIDE,
    PHOTOS,
    PLACEMENTS,
    PhotoBenchmarkConfig,
    draw_defect,
    edge_point,
    load_photo,
    normal_crop,
    write_photo_benchmark,
)
from cdd_ray.data.prepare import prepare

SMALL = PhotoBenchmarkConfig(image_size=32, train_normal=4, test_normal=2, test_anomalous=8)


def test_the_reserved_photographs_are_refused():
    for name in ("brick", "grass", "gravel"):
        with pytest.raises(ValueError, match="reserved for the independent check"):
            load_photo(name)
    assert not {p.name for p in PHOTOS.values()} & {"brick", "grass", "gravel"}


@pytest.mark.parametrize("at", PLACEMENTS)
@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_changes_exactly_its_mask_and_visibly(defect, at):
    rng = np.random.default_rng(3)
    image = normal_crop(load_photo("moon"), PHOTOS["lunar"], rng, 64)
    foreign = np.random.default_rng(4).random((128, 128, 3))
    out, mask = draw_defect(defect, rng, image, foreign, at)
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


def test_a_tree_written_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two benchmark jobs started together both find no tree and both write one: the second to
    finish gets a FileExistsError naming the folder, the first one's tree stays whole and no
    staging folder is left behind."""
    import cdd_ray.data.photos as photos

    out = tmp_path / "tree"
    write_category = photos._write_category

    def other_process_finishes_first(base, category, config):
        (out / category).mkdir(parents=True)
        (out / category / "theirs.txt").write_text("written by the other job")
        return write_category(base, category, config)

    monkeypatch.setattr(photos, "_write_category", other_process_finishes_first)
    with pytest.raises(FileExistsError, match="another process"):
        photos.write_photo_benchmark(out, PhotoBenchmarkConfig(image_size=32, categories=("tissue",)))
    assert (out / "tissue" / "theirs.txt").read_text() == "written by the other job"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]


def share_in_border_band(mask: np.ndarray, band: float = 0.125) -> float:
    """The share of a mask's pixels less than ``band`` x the image's side from its border."""
    size = mask.shape[0]
    rows, cols = np.mgrid[0:size, 0:size]
    distance = np.minimum(np.minimum(rows, cols), np.minimum(size - 1 - rows, size - 1 - cols))
    return float((mask & (distance < band * size)).sum() / mask.sum())


@pytest.mark.parametrize("defect", DEFECTS)
def test_edge_defects_lie_next_to_a_side_and_middle_ones_do_not(defect):
    photo = load_photo("moon")
    foreign = np.random.default_rng(4).random((128, 128, 3))
    shares = {}
    for at in PLACEMENTS:
        rng = np.random.default_rng(11)
        masks = [
            draw_defect(defect, rng, normal_crop(photo, PHOTOS["lunar"], rng, 64), foreign, at)[1]
            for _ in range(12)
        ]
        shares[at] = np.mean([share_in_border_band(m) for m in masks])
        if at == "edge":
            assert min(m.sum() for m in masks) >= MIN_EDGE_PIXELS_PER_SIDE * 64  # no sliver left
            bands = [[m[:, :8].sum(), m[:, -8:].sum(), m[:8].sum(), m[-8:].sum()] for m in masks]
            nearest = {int(np.argmax(b)) for b in bands if max(b) > 0}
            assert len(nearest) >= 3, nearest  # the sides are drawn, not one favoured
    assert shares["edge"] >= 0.6, shares  # measured at 128 px: 0.81-0.91 in the outer 16 px
    assert shares["middle"] <= 0.4, shares  # measured at 128 px: 0-0.01 for blobs, 0.20 for scratches


def test_an_edge_tree_has_the_same_normal_images_and_a_bad_placement_is_refused(tmp_path, capsys):
    config = PhotoBenchmarkConfig(
        image_size=32, train_normal=2, test_normal=2, test_anomalous=4, categories=("lunar",)
    )
    write_photo_benchmark(tmp_path / "middle", config)
    args = ["photo-benchmark", "--out", str(tmp_path / "edge"), "--category", "lunar", "--image-size", "32"]
    assert main([*args, "--defects-at", "edge"]) == 0
    for split in ("train/good/000.png", "test/good/001.png"):
        assert (tmp_path / "middle/lunar" / split).read_bytes() == (
            tmp_path / "edge/lunar" / split
        ).read_bytes()
    masks = sorted((tmp_path / "edge/lunar/ground_truth").glob("*/*.png"))
    assert len(masks) == 80  # the command's default count
    assert np.mean([share_in_border_band(np.asarray(Image.open(m)) > 0) for m in masks]) >= 0.6
    with pytest.raises(ValueError, match="defects_at must be one of"):
        write_photo_benchmark(tmp_path / "corner", PhotoBenchmarkConfig(defects_at="corner"))
    assert not (tmp_path / "corner").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "edge",
        "middle",
    ]
    with pytest.raises(SystemExit):
        main(["photo-benchmark", "--out", str(tmp_path / "x"), "--defects-at", "corner"])
    assert "invalid choice" in capsys.readouterr().err


def test_edge_points_lie_in_the_band_of_the_side_they_name():
    rng = np.random.default_rng(5)
    low, high = EDGE_BAND
    seen = set()
    for _ in range(200):
        (x, y), side = edge_point(rng)
        seen.add(side)
        across = {0: x, 1: 1 - x, 2: y, 3: 1 - y}[side]  # distance from the named side (x: columns)
        along = y if side < 2 else x
        assert low <= across <= high and 0.05 <= along <= 0.95, (side, x, y)
    assert seen == {0, 1, 2, 3}


def test_the_command_accepts_every_placement_the_module_draws():
    from cdd_ray.cli import build_parser

    for at in PLACEMENTS:  # a placement missing from the command's choices exits here
        assert (
            build_parser().parse_args(["photo-benchmark", "--out", "x", "--defects-at", at]).defects_at == at
        )
