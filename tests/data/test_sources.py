import io
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cdd_ray.data.images import BadImageError, MaskMismatchError, decode_image
from cdd_ray.data.prepare import prepare
from cdd_ray.data.sources import SourceError, read_source
from cdd_ray.data.store import SAMPLES_FILE, STORE_FILE, StoreError, check_store, write_atomic
from tests.data.trees import SIZE, mvtec_tree, rgb, square_mask, visa_csv_tree, write_png


def rows(store):
    return pq.read_table(store / SAMPLES_FILE).to_pylist()


def test_mvtec_layout_is_read_with_masks(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    prepare("mvtec", root, tmp_path / "store")
    table = rows(tmp_path / "store")
    assert len(table) == 6 + 2 + 6
    anomalous = [r for r in table if r["label"] == 1]
    assert {r["defect_type"] for r in anomalous} == {"crack", "hole"}
    assert all(r["mask"] is not None and r["split"] == "test" for r in anomalous)
    assert all(r["mask"] is None for r in table if r["label"] == 0)
    assert {r["sample_id"] for r in table if r["split"] == "train"} == {
        f"widget/train/good/{i:03d}" for i in range(6)
    }


def test_visa_csv_layout(tmp_path):
    root = visa_csv_tree(tmp_path / "visa")
    entries = read_source("visa", root)
    assert sum(e.split == "train" for e in entries) == 4
    assert sum(e.label for e in entries) == 3 and all(e.mask_path for e in entries if e.label)


def test_visa_folder_layout_without_csv(tmp_path):
    root = visa_csv_tree(tmp_path / "visa")
    shutil.rmtree(root / "split_csv")
    entries = read_source("visa", root, test_fraction=0.2, seed=0)
    assert sum(e.split == "test" and e.label == 0 for e in entries) == 1
    assert sum(e.label for e in entries) == 3


def test_folder_source(tmp_path):
    for i in range(5):
        write_png(tmp_path / "ok" / f"{i}.png", rgb(i))
    write_png(tmp_path / "bad" / "x.png", rgb(9))
    write_png(tmp_path / "masks" / "x.png", square_mask())
    entries = read_source(
        "folder", tmp_path / "ok", ["parts"], abnormal_dir=tmp_path / "bad", mask_dir=tmp_path / "masks"
    )
    assert {e.category for e in entries} == {"parts"}
    assert [e.mask_path.name for e in entries if e.label] == ["x.png"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b"this is not an image", "not a readable image")],
)
def test_bad_training_file_is_named(tmp_path, content, message):
    root = mvtec_tree(tmp_path / "mvtec")
    bad = root / "widget" / "train" / "good" / "zz_bad.png"
    bad.write_bytes(content)
    with pytest.raises(BadImageError, match=f"zz_bad.png.*{message}|{message}"):
        prepare("mvtec", root, tmp_path / "store")
    assert not (tmp_path / "store" / SAMPLES_FILE).exists()


def test_truncated_image_is_named_and_skip_bad_counts(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    good = (root / "widget" / "train" / "good" / "000.png").read_bytes()
    (root / "widget" / "train" / "good" / "zz_trunc.png").write_bytes(good[: len(good) // 2])
    (root / "widget" / "train" / "good" / "notes.txt").write_text("not an image")
    with pytest.raises(BadImageError, match="zz_trunc.png|notes.txt"):
        prepare("mvtec", root, tmp_path / "store")
    summary = prepare("mvtec", root, tmp_path / "store", skip_bad=True)
    assert len(summary["skipped"]) == 2
    assert len([r for r in rows(tmp_path / "store") if r["split"] == "train"]) == 6


def test_missing_mask_names_image_and_mask(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    (root / "widget" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(SourceError, match=r"hole/001\.png.*001_mask\.png"):
        read_source("mvtec", root)


def test_mask_of_wrong_size_names_both_files(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    write_png(root / "widget" / "ground_truth" / "crack" / "000_mask.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(MaskMismatchError, match=r"000_mask\.png.*crack/000\.png"):
        prepare("mvtec", root, tmp_path / "store", skip_bad=True)


def test_empty_category_is_an_error(tmp_path):
    (tmp_path / "mvtec" / "empty" / "train" / "good").mkdir(parents=True)
    (tmp_path / "mvtec" / "empty" / "test").mkdir(parents=True)
    with pytest.raises(SourceError, match="no images|no training images"):
        read_source("mvtec", tmp_path / "mvtec")


def test_image_modes_are_converted_to_8bit_rgb(tmp_path):
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    sixteen = (gray.astype(np.uint16) * 257).astype(np.uint16)
    rgba = np.dstack([rgb(1), np.full((SIZE, SIZE), 128, np.uint8)])
    for name, array in [("g.png", gray), ("s.png", sixteen), ("a.png", rgba)]:
        write_png(tmp_path / name, array)
    assert Image.open(tmp_path / "s.png").mode.startswith("I")
    g = decode_image((tmp_path / "g.png").read_bytes(), "g")
    s = decode_image((tmp_path / "s.png").read_bytes(), "s")
    a = decode_image((tmp_path / "a.png").read_bytes(), "a")
    assert g.shape == s.shape == a.shape == (16, 16, 3) and g.dtype == s.dtype == np.uint8
    assert np.array_equal(g[..., 0], gray) and np.abs(s[..., 0].astype(int) - gray).max() <= 1
    assert np.array_equal(a, rgb(1))


def test_masks_are_binarized_at_half(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    soft = np.zeros((SIZE, SIZE), dtype=np.uint8)
    soft[0, 0], soft[0, 1] = 127, 128
    write_png(root / "widget" / "ground_truth" / "crack" / "000_mask.png", soft)
    prepare("mvtec", root, tmp_path / "store")
    row = next(r for r in rows(tmp_path / "store") if r["sample_id"] == "widget/test/crack/000")
    mask = np.asarray(Image.open(io.BytesIO(row["mask"])))
    assert mask[0, 0] == 0 and mask[0, 1] == 255 and mask.sum() == 255


def test_store_version_is_checked(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    prepare("mvtec", root, tmp_path / "store")
    write_atomic(tmp_path / "store" / STORE_FILE, '{"format_version": 99}')
    with pytest.raises(StoreError, match="format 99"):
        check_store(tmp_path / "store")


def test_failed_prepare_keeps_the_previous_store(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    prepare("mvtec", root, tmp_path / "store")
    before = (tmp_path / "store" / SAMPLES_FILE).read_bytes()
    (root / "widget" / "train" / "good" / "zz.png").write_bytes(b"garbage")
    with pytest.raises(BadImageError):
        prepare("mvtec", root, tmp_path / "store")
    assert (tmp_path / "store" / SAMPLES_FILE).read_bytes() == before
    assert not list((tmp_path / "store").glob(".*tmp"))
