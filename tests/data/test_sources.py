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


def stored_mask(store, sample_id: str) -> np.ndarray:
    row = next(r for r in rows(store) if r["sample_id"] == sample_id)
    return np.asarray(Image.open(io.BytesIO(row["mask"]))) > 0


def palette_mask(values: np.ndarray) -> Image.Image:
    image = Image.fromarray(values, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    return image


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(lambda m: Image.fromarray(m * 255), id="0/255"),
        pytest.param(lambda m: Image.fromarray(m), id="0/1"),
        pytest.param(lambda m: Image.fromarray(m * 40), id="0/40"),
        pytest.param(lambda m: Image.fromarray(m * np.uint8(3)), id="class id 3"),
        pytest.param(lambda m: palette_mask(m * np.uint8(2)), id="palette index 2"),
        pytest.param(lambda m: Image.fromarray(m.astype(np.uint16) * 1), id="16-bit 0/1"),
        pytest.param(lambda m: Image.fromarray(np.stack([m, 0 * m, 0 * m], 2)), id="RGB 0/1 in red"),
    ],
)
def test_masks_mark_a_defect_wherever_the_stored_value_is_non_zero(tmp_path, stored):
    root = mvtec_tree(tmp_path / "mvtec")
    truth = square_mask() > 0
    for defect in ("crack", "hole"):
        for path in (root / "widget" / "ground_truth" / defect).iterdir():
            stored(truth.astype(np.uint8)).save(path)
    prepare("mvtec", root, tmp_path / "store")
    assert np.array_equal(stored_mask(tmp_path / "store", "widget/test/crack/000"), truth)


def test_an_anomalous_image_whose_mask_marks_nothing_is_refused_with_both_names(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    mask = root / "widget" / "ground_truth" / "hole" / "001_mask.png"
    write_png(mask, np.zeros((SIZE, SIZE), dtype=np.uint8))
    with pytest.raises(MaskMismatchError, match="001_mask.png.*hole/001.png.*marks no defect pixel"):
        prepare("mvtec", root, tmp_path / "store")
    assert not (tmp_path / "store" / SAMPLES_FILE).exists()


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    upright = rgb(7)
    upright[:4, :, :] = 255  # a bright band at the top, as a viewer shows the photo
    sideways = Image.fromarray(np.rot90(upright, k=1))  # stored rotated, tagged to be turned back
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image_path = root / "widget" / "test" / "crack" / "000.png"
    sideways.save(image_path, exif=exif)
    prepare("mvtec", root, tmp_path / "store")
    row = next(r for r in rows(tmp_path / "store") if r["sample_id"] == "widget/test/crack/000")
    decoded = np.asarray(Image.open(io.BytesIO(row["image"])))
    assert np.array_equal(decoded, upright)
    assert np.array_equal(decode_image(image_path.read_bytes(), "x"), upright)


def test_hidden_folders_are_never_data_and_a_visible_nested_folder_is_refused(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    write_png(root / "widget" / "test" / ".ipynb_checkpoints" / "000-checkpoint.png", rgb(1))
    write_png(root / ".cache" / "train" / "good" / "x.png", rgb(2))
    entries = read_source("mvtec", root)
    assert {e.defect_type for e in entries} == {"good", "crack", "hole"}
    assert {e.category for e in entries} == {"widget"}
    write_png(root / "widget" / "train" / "good" / "more" / "000.png", rgb(3))
    with pytest.raises(SourceError, match="good/more: a folder inside the image folder"):
        read_source("mvtec", root)


def test_sixteen_bit_images_scale_by_their_format_not_their_content(tmp_path):
    dim = np.full((SIZE, SIZE), 1000, dtype=np.uint16)
    bright = dim.copy()
    bright[0, 0] = 65535
    for name, values in (("dim", dim), ("bright", bright)):
        Image.fromarray(values).save(tmp_path / f"{name}.png")
    low = decode_image((tmp_path / "dim.png").read_bytes(), "dim")
    high = decode_image((tmp_path / "bright.png").read_bytes(), "bright")
    assert low[1, 1, 0] == high[1, 1, 0] == round(1000 / 65535 * 255)
    assert high[0, 0, 0] == 255
    Image.fromarray(dim.astype(np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(BadImageError, match="wide.tif: 32-bit integer pixels"):
        decode_image((tmp_path / "wide.tif").read_bytes(), str(tmp_path / "wide.tif"))


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
