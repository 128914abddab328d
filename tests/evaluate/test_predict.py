"""``cdd-ray predict``: inputs expand, outputs never collide, decisions follow the chosen threshold.
No Ray: the run directory is written by hand (a memory bank needs no training)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdd_ray.evaluate.predict import ThresholdError, expand_inputs, predict_images
from tests.data.trees import rgb, write_png
from tests.evaluate.conftest import checkpoint_of, write_run


def test_folders_and_globs_expand_and_same_named_inputs_get_their_own_maps(bank_run, tmp_path):
    images = tmp_path / "images"
    left = write_png(images / "cam_left" / "0001.png", rgb(1, 40))
    right = write_png(images / "cam_right" / "0001.png", rgb(2, 40))
    write_png(images / "cam_left" / ".ipynb_checkpoints" / "0001-checkpoint.png", rgb(3, 40))
    (images / "notes.txt").write_text("not an image")
    extra = write_png(tmp_path / "more" / "0002.png", rgb(4, 40))
    inputs = [images, tmp_path / "more" / "*.png", left]
    rows = predict_images(bank_run, checkpoint_of(bank_run), inputs, tmp_path / "out", None)
    assert [Path(r["image"]) for r in rows] == [left.resolve(), right.resolve(), extra.resolve()]
    maps = [Path(r["map"]) for r in rows]
    assert len(set(maps)) == 3 and all(m.is_file() for m in maps)
    assert maps[0] == tmp_path / "out" / "images" / "cam_left" / "0001_map.png"
    assert maps[1] == tmp_path / "out" / "images" / "cam_right" / "0001_map.png"
    assert all(r["anomalous"] is None and r["mask"] is None for r in rows)


@pytest.mark.parametrize("how", ["evaluated", 0.5, "quantile:0.9"])
def test_decisions_and_region_masks_follow_the_threshold(bank_run, tmp_path, how):
    image = write_png(tmp_path / "part.png", rgb(5, 40))
    rows = predict_images(bank_run, checkpoint_of(bank_run), [image], tmp_path / "out", how)
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    threshold = written["threshold"]
    if how == "evaluated":
        assert (threshold["image"], threshold["pixel"]) == (1.5, 1.0)
    elif how == 0.5:
        assert threshold["image"] == threshold["pixel"] == 0.5
    else:
        assert threshold["source"] == "quantile 0.9 of 3 held-out images"
    row = rows[0]
    assert row["anomalous"] == (row["score"] >= threshold["image"]) and row["threshold"] == threshold["image"]
    region = np.asarray(Image.open(row["mask"])) > 0
    anomaly_map = np.asarray(Image.open(row["map"]))
    assert region.shape == anomaly_map.shape[:2]
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        assert next(csv.DictReader(handle))["anomalous"] == str(row["anomalous"])


def test_a_threshold_that_cannot_be_had_is_explained(bank_run, tmp_path):
    image = write_png(tmp_path / "part.png", rgb(5, 40))
    (bank_run / "metrics.json").unlink()
    with pytest.raises(ThresholdError, match="not evaluated.*--threshold or --quantile"):
        predict_images(bank_run, checkpoint_of(bank_run), [image], tmp_path / "out", "evaluated")
    (bank_run / "domains.json").write_text(json.dumps({"holdout": []}))
    with pytest.raises(ThresholdError, match="held no images out"):
        predict_images(bank_run, checkpoint_of(bank_run), [image], tmp_path / "out", "quantile:0.9")


def test_an_input_that_matches_nothing_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        expand_inputs([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no image files"):
        expand_inputs([tmp_path / "empty"])


def test_a_checkpoint_rebuilds_the_student_its_config_records(tmp_path):
    import torch

    from cdd_ray.evaluate.scoring import load_detector

    settings = ("student.embedding_stride=1", "student.width_factor=2")
    run = write_run(tmp_path, "distillation", settings)
    detector, config = load_detector(checkpoint_of(run), torch.device("cpu"))
    spec = detector.student.spec
    assert (config.student.embedding_stride, config.student.width_factor) == (1, 2)
    assert (spec.embedding_stride, spec.width_factor) == (1, 2)
    with torch.no_grad():
        maps, scores = detector(torch.rand(2, 3, 32, 32))
    assert maps.shape[-2:] == (32, 32) and scores.shape == (2,) and torch.isfinite(scores).all()


def test_a_split_without_rows_reads_as_empty_arrays_and_summarizes_as_nothing_to_score(tiny_store):
    from cdd_ray.evaluate.report import summarize
    from cdd_ray.evaluate.scoring import read_split_arrays

    data = read_split_arrays(tiny_store, "test", "weave", 32, sample_ids=[])
    assert data["image"].shape == (0, 3, 32, 32) and data["mask"].shape == (0, 32, 32)
    assert len(data["sample_id"]) == len(data["label"]) == 0
    results = {k: data[k] for k in ("category", "label", "mask")}
    assert summarize(results)["not_computed"] == ["no test images to score"]
