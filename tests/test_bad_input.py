"""Bad input through the command line: exit code 2, a message naming the culprit, nothing half-written."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from cdd_ray.cli import main
from cdd_ray.data.images import decode_images
from cdd_ray.data.store import SAMPLES_FILE
from tests.conftest import tiny_overrides
from tests.data.trees import mvtec_tree, rgb, write_png


def break_zero_byte(root):
    (root / "widget" / "train" / "good" / "zz_empty.png").write_bytes(b"")
    return "zz_empty.png"


def break_not_an_image(root):
    (root / "widget" / "train" / "good" / "zz_text.png").write_text("hello")
    return "zz_text.png"


def break_truncated(root):
    good = (root / "widget" / "train" / "good" / "000.png").read_bytes()
    (root / "widget" / "train" / "good" / "zz_cut.png").write_bytes(good[: len(good) // 2])
    return "zz_cut.png"


def break_mask_size(root):
    write_png(root / "widget" / "ground_truth" / "hole" / "001_mask.png", np.zeros((5, 7), dtype=np.uint8))
    return "001_mask.png"


def break_empty_category(root):
    (root / "hollow" / "train" / "good").mkdir(parents=True)
    (root / "hollow" / "test").mkdir(parents=True)
    return "hollow"


@pytest.mark.parametrize(
    "breaker", [break_zero_byte, break_not_an_image, break_truncated, break_mask_size, break_empty_category]
)
def test_prepare_refuses_bad_files_by_name_and_keeps_the_previous_store(tmp_path, capsys, breaker):
    root = mvtec_tree(tmp_path / "mvtec")
    out = tmp_path / "store"
    assert main(["prepare", "mvtec", str(root), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    culprit = breaker(root)
    assert main(["prepare", "mvtec", str(root), "--out", str(out)]) == 2
    assert culprit in capsys.readouterr().out.replace("\n", "")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the old store was touched"


@pytest.mark.parametrize(
    ("ratio", "message"), [("1.0", "noise ratio must lie in [0, 1)"), ("-0.1", "[0, 1)")]
)
def test_prepare_refuses_a_noise_ratio_outside_0_1(tmp_path, capsys, ratio, message):
    out = tmp_path / "store"
    assert (
        main(["prepare", "synthetic", "--out", str(out), "--category", "pill", "--noise-ratio", ratio]) == 2
    )
    assert message in capsys.readouterr().out.replace("\n", "")
    assert not out.exists() or not (out / SAMPLES_FILE).exists()


def test_images_of_mixed_sizes_and_modes_prepare_to_one_shape(tmp_path):
    root = mvtec_tree(tmp_path / "mvtec")
    good = root / "widget" / "train" / "good"
    write_png(good / "big.png", rgb(7, size=40))
    write_png(good / "gray.png", rgb(8, size=24)[..., 0])
    assert main(["prepare", "mvtec", str(root), "--out", str(tmp_path / "store")]) == 0
    table = pq.read_table(tmp_path / "store" / SAMPLES_FILE, filters=[("split", "=", "train")])
    images = decode_images(table["image"].to_pylist(), table["sample_id"].to_pylist(), 32)
    assert images.shape == (8, 3, 32, 32) and np.isfinite(images).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-0.001", "optim.lr: must be positive"),
        ("train.num_domian=2", "unknown config key 'train.num_domian'"),
        ("train.num_domains=500", "larger than the training set"),
        ("data.shuffle_window=7", "data.shuffle_window: must be at least 2 x train.batch_size = 8 rows"),
        ("train.teacher_cache_mb=-1", "train.teacher_cache_mb: must be >= 0"),
        ("student.embedding_stride=3", "student.embedding_stride: must be one of (1, 2)"),
        ("student.width_factor=0", "student.width_factor: must be >= 1"),
    ],
)
def test_train_refuses_bad_settings_before_any_checkpoint(
    ray_session, tiny_store, tmp_path, capsys, override, message
):
    args = tiny_overrides(tiny_store, tmp_path / "runs", name="refused") + [override]
    assert main(["train", *args]) == 2
    assert message in capsys.readouterr().out.replace("\n", "")
    assert not list((tmp_path / "runs").glob("refused/checkpoint_*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.num_domains=2", "ray.num_workers=0"], "domain 1 holds 1 training image"),
        (["train.num_domains=1", "ray.num_workers=2"], "leaves a worker fewer than 2 images"),
        (["method=softpatch", "ray.num_workers=0"], "needs more than memory_bank.outlier_neighbors=6"),
    ],
)
def test_a_set_too_small_for_the_run_is_refused_before_any_worker_starts(
    ray_session, tmp_path, capsys, overrides, message
):
    from cdd_ray.data.prepare import prepare
    from cdd_ray.data.synthetic import SyntheticConfig

    synthetic = SyntheticConfig(image_size=32, train_normal=3, test_normal=2, test_anomalous=2)
    prepare("synthetic", None, tmp_path / "store", ["weave"], synthetic=synthetic)
    args = tiny_overrides(tmp_path / "store", tmp_path / "runs", name="tiny") + overrides
    assert main(["train", *args]) == 2
    out = capsys.readouterr().out.replace("\n", "")
    assert message in out and "resumes" not in out
    assert not list((tmp_path / "runs").glob("tiny/checkpoint_*"))
