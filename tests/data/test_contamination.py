import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cdd_ray.data.contamination import ContaminationError, apply_contamination, augment, plan_contamination
from cdd_ray.data.prepare import prepare
from cdd_ray.data.sources import read_source
from cdd_ray.data.store import MANIFEST_FILE, SAMPLES_FILE
from cdd_ray.data.synthetic import SyntheticConfig

SMALL = SyntheticConfig(image_size=32, train_normal=20, test_normal=5, test_anomalous=12)


def entries():
    return read_source("synthetic", categories=["weave", "pill"], synthetic=SMALL)


def test_counts_follow_softpatch_definition():
    plan = plan_contamination(entries(), ratio=0.25, seed=0)
    assert {c: len(ids) for c, ids in plan.injected.items()} == {"pill": 5, "weave": 5}  # round(0.25 * 20)
    after = apply_contamination(entries(), plan)
    for category in ("weave", "pill"):
        train = [e for e in after if e.category == category and e.split == "train"]
        assert len(train) == 25 and sum(e.injected for e in train) == 5
        assert all(e.label == 1 for e in train if e.injected)


def test_no_overlap_removes_injected_images_from_the_test_set_and_overlap_keeps_them():
    source = entries()
    plan = plan_contamination(source, ratio=0.25, overlap=False, seed=1)
    moved = {sid for ids in plan.injected.values() for sid in ids}
    test_ids = {e.sample_id for e in apply_contamination(source, plan) if e.split == "test"}
    assert not moved & test_ids
    assert len(test_ids) == 2 * (5 + 12) - 10
    overlapping = plan_contamination(source, ratio=0.25, overlap=True, seed=1)
    kept = {e.sample_id for e in apply_contamination(source, overlapping) if e.split == "test"}
    assert moved <= kept and len(kept) == 2 * (5 + 12)


def test_selection_is_seeded_and_spans_defect_types():
    first = plan_contamination(entries(), 0.5, seed=3).injected
    assert first == plan_contamination(entries(), 0.5, seed=3).injected
    assert first != plan_contamination(entries(), 0.5, seed=4).injected
    types = {sid.split("/")[2] for sid in first["weave"]}
    assert len(types) >= 2


def test_too_few_anomalies_is_a_clear_error_unless_resampling():
    with pytest.raises(ContaminationError, match=r"needs 18 anomalous images.*only 12 exist.*--resample"):
        plan_contamination(entries(), ratio=0.9)
    plan = plan_contamination(entries(), ratio=0.9, resample=True)
    assert len(plan.injected["weave"]) == 18
    after = apply_contamination(entries(), plan)
    copies = [e for e in after if e.sample_id.endswith("@train1")]
    assert copies and all(e.augment_seed == 1 for e in copies)


def test_noise_ratio_out_of_range():
    with pytest.raises(ContaminationError, match=r"\[0, 1\)"):
        plan_contamination(entries(), ratio=1.0)


def test_augmented_copy_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    image[10:20, 10:20] = 255
    mask = image[..., 0] > 0
    moved, moved_mask = augment(image, mask, rng)
    assert moved.shape == image.shape and moved_mask.shape == mask.shape
    assert not np.array_equal(moved, image)
    bright = moved[..., 0] > 127
    assert (bright == moved_mask).mean() > 0.97


def test_prepare_writes_and_reuses_the_manifest(tmp_path):
    prepare("synthetic", None, tmp_path, ["weave"], noise_ratio=0.25, seed=2, synthetic=SMALL)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["ratio"] == 0.25 and len(manifest["injected"]["weave"]) == 5
    injected = {r["sample_id"] for r in pq.read_table(tmp_path / SAMPLES_FILE).to_pylist() if r["injected"]}
    assert injected == {sid + "@train" for sid in manifest["injected"]["weave"]}
    # A hand-edited manifest with the same settings is what a later prepare uses.
    manifest["injected"]["weave"] = sorted(manifest["injected"]["weave"])[:4] + ["weave/test/hole/001"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    summary = prepare("synthetic", None, tmp_path, ["weave"], noise_ratio=0.25, seed=2, synthetic=SMALL)
    assert summary["manifest_reused"]
    injected = {r["sample_id"] for r in pq.read_table(tmp_path / SAMPLES_FILE).to_pylist() if r["injected"]}
    assert "weave/test/hole/001@train" in injected


def test_concentrated_contamination_draws_one_defect_type_and_names_an_unknown_one():
    source = read_source("synthetic", categories=["weave"], synthetic=SMALL)
    plan = plan_contamination(source, ratio=0.1, seed=0, defect_types=["hole"])
    types = {e.sample_id: e.defect_type for e in source}
    assert len(plan.injected["weave"]) == 2 and {types[i] for i in plan.injected["weave"]} == {"hole"}
    with pytest.raises(ContaminationError, match=r"defect type\(s\) \['dent'\].*'hole'"):
        plan_contamination(source, ratio=0.1, defect_types=["dent"])


def test_a_manifest_is_reused_only_for_the_same_defect_types(tmp_path):
    out = tmp_path / "store"
    prepare("synthetic", None, out, ["weave"], noise_ratio=0.1, synthetic=SMALL, defect_types=["hole"])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["defect_types"] == ["hole"]
    again = prepare(
        "synthetic", None, out, ["weave"], noise_ratio=0.1, synthetic=SMALL, defect_types=["hole"]
    )
    assert again["manifest_reused"]
    other = prepare("synthetic", None, out, ["weave"], noise_ratio=0.1, synthetic=SMALL)
    assert not other["manifest_reused"]


def test_prepare_warns_when_a_test_set_keeps_no_anomaly_and_evaluation_says_what_it_cannot_compute(
    tmp_path,
):
    from cdd_ray.evaluate.report import summarize

    synthetic = SyntheticConfig(image_size=16, train_normal=10, test_normal=4, test_anomalous=2)
    summary = prepare("synthetic", None, tmp_path / "s", ["pill"], noise_ratio=0.2, synthetic=synthetic)
    assert summary["counts"]["pill/test/normal"] == 4 and "pill/test/anomalous" not in summary["counts"]
    assert any("pill: the test set has no anomalous image" in w for w in summary["warnings"])
    results = {
        "category": np.array(["pill"] * 4),
        "label": np.zeros(4, dtype=np.int64),
        "score": np.arange(4.0),
        "map": np.zeros((4, 8, 8)),
        "mask": np.zeros((4, 8, 8), dtype=np.uint8),
    }
    metrics = summarize(results)
    assert "image_auroc" not in metrics and metrics["per_category"]["pill"] == {}
    assert "only normal images" in metrics["not_computed"][0]
