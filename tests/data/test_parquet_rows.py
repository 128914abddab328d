"""A rank's rows read straight from the Parquet store: the same rows, in the same order and with the
same pixels as the Ray Data read, only the row groups a pass needs, and a clear error when the store
is not the one the run partitioned or lacks the rank's rows."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from cdd_ray.data.batches import decode_batch
from cdd_ray.data.parquet_rows import ParquetRows, decoded_mib, store_fingerprint, uses_object_store
from cdd_ray.data.prepare import prepare
from cdd_ray.data.store import SAMPLES_FILE, StoreError
from cdd_ray.data.synthetic import SyntheticConfig


def weave_train_ids(store):
    table = pq.read_table(store / SAMPLES_FILE, columns=["sample_id", "category", "split"])
    return [r["sample_id"] for r in table.to_pylist() if (r["category"], r["split"]) == ("weave", "train")]


def test_a_pass_gives_the_wanted_rows_in_file_order_with_the_decoded_pixels(tiny_store):
    ids = weave_train_ids(tiny_store)
    assignment = {sid: i % 3 - 1 for i, sid in enumerate(ids)}  # domains 0, 1 and held out (-1)
    keep = frozenset(ids[::2])
    members = frozenset(sorted(keep)[: len(keep) // 2])
    rows = ParquetRows(tiny_store, "weave", 32, assignment, keep)
    blocks = list(rows(members))
    got = [str(s) for b in blocks for s in b["sample_id"]]
    assert got == [sid for sid in ids if sid in members]
    whole = decode_batch(pq.read_table(tiny_store / SAMPLES_FILE), "train", "weave", 32, False, assignment)
    position = {str(s): i for i, s in enumerate(whole["sample_id"])}
    images = np.concatenate([b["image"] for b in blocks])
    assert images.dtype == np.uint8 and images.shape == (len(got), 3, 32, 32)
    assert np.array_equal(images, whole["image"][[position[s] for s in got]])
    assert np.concatenate([b["domain"] for b in blocks]).tolist() == [assignment[s] for s in got]
    assert list(rows(frozenset())) == []  # no wanted row: nothing read


def test_a_pass_opens_only_the_row_groups_that_hold_its_rows(tmp_path, monkeypatch):
    store = tmp_path / "store"  # weave's rows, then bolts': 4 row groups of 64 rows
    prepare(
        "synthetic",
        None,
        store,
        ["weave", "bolts"],
        synthetic=SyntheticConfig(image_size=32, train_normal=100),
    )
    ids = weave_train_ids(store)
    rows = ParquetRows(store, "weave", 32, dict.fromkeys(ids, 0), frozenset(ids))
    with pq.ParquetFile(store / SAMPLES_FILE) as parquet:
        total = parquet.num_row_groups
    assert 0 < len(rows.groups) < total  # bolts' groups are left out
    opened = []
    read = pq.ParquetFile.read_row_group

    def spy(self, group, *args, **kwargs):
        opened.append(group)
        return read(self, group, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    first_group, first_ids = rows.groups[0]
    list(rows(frozenset([min(first_ids)])))
    assert opened == [first_group]


def test_a_store_prepared_again_during_a_run_is_an_error_naming_the_file(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    assert store_fingerprint(store) == store_fingerprint(tiny_store)  # a copy is the same store
    ids = weave_train_ids(store)
    rows = ParquetRows(
        store, "weave", 32, dict.fromkeys(ids, 0), frozenset(ids), store_fingerprint(tiny_store)
    )
    assert len(list(rows(frozenset(ids)))) > 0
    table = pq.read_table(store / SAMPLES_FILE)
    pq.write_table(table, store / SAMPLES_FILE, row_group_size=16)  # the same rows, written again
    with pytest.raises(StoreError, match="samples.parquet is not the store this run partitioned"):
        list(rows(frozenset(ids)))
    with pytest.raises(StoreError, match="not the store this run partitioned"):  # a worker starting now
        ParquetRows(store, "weave", 32, dict.fromkeys(ids, 0), frozenset(ids), store_fingerprint(tiny_store))


def test_ids_the_store_lacks_are_an_error_not_a_short_pass(tiny_store):
    ids = weave_train_ids(tiny_store)
    with pytest.raises(StoreError, match="lacks 1 of the .* training images .*data.category='weave'"):
        ParquetRows(tiny_store, "weave", 32, dict.fromkeys(ids, 0), frozenset([*ids, "weave/train/good/999"]))


def test_an_empty_category_reads_every_category(tiny_store):
    table = pq.read_table(tiny_store / SAMPLES_FILE, columns=["sample_id", "split"]).to_pylist()
    ids = [r["sample_id"] for r in table if r["split"] == "train"]
    assert {sid.split("/")[0] for sid in ids} == {"weave", "bolts"}
    rows = ParquetRows(tiny_store, "", 32, dict.fromkeys(ids, 0), frozenset(ids))
    assert [str(s) for b in rows(frozenset(ids)) for s in b["sample_id"]] == ids


def test_a_file_that_is_not_parquet_is_an_error_naming_it(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    (store / SAMPLES_FILE).write_bytes(b"not a parquet file at all")
    with pytest.raises(StoreError, match="samples.parquet is not a Parquet file"):
        store_fingerprint(store)


def test_a_missing_store_is_an_error_naming_it(tmp_path):
    with pytest.raises(StoreError, match=str(tmp_path / "nowhere")):
        ParquetRows(tmp_path / "nowhere", "weave", 32, {}, frozenset())


def test_the_object_store_budget_counts_decoded_uint8_images():
    assert decoded_mib(1024, 128) == pytest.approx(48.0)  # 3 x 128 x 128 bytes each
    assert uses_object_store(1024, 128, 48.0) and not uses_object_store(1025, 128, 48.0)
    assert not uses_object_store(1, 32, 0.0) and uses_object_store(0, 32, 0.0)
