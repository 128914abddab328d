"""A rank's rows streamed per pass: a window-shuffle that equals the in-memory shuffle for small
parts, needs only a window of rows, and does not depend on the order blocks arrive in."""

import logging
import random

import numpy as np
import pytest
import torch

from cdd_ray.data.sharding import rank_rows
from cdd_ray.train.engine import batches
from cdd_ray.train.rank_stream import (
    HOLDOUT,
    SHARD,
    RankStream,
    batch_count,
    cache_decision,
    target_cache_fits,
)

SIZE = 4


def make_rows(n: int, num_domains: int = 2) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    ids = [f"id{i:04d}" for i in range(n)]
    given = {sid: i % num_domains for i, sid in enumerate(ids)}
    images = {sid: np.full((3, SIZE, SIZE), i % 251, dtype=np.uint8) for i, sid in enumerate(ids)}
    return given, images


def block_source(given, images, block: int, seed: int | None = None, seen: list | None = None):
    """Blocks of ``block`` rows in id order, or in a shuffled block order with ``seed``."""
    ids = list(given)
    chunks = [ids[i : i + block] for i in range(0, len(ids), block)]
    if seed is not None:
        random.Random(seed).shuffle(chunks)

    def source(members=None):
        for chunk in chunks:
            if seen is not None:
                seen.append(len(chunk))
            yield {
                "sample_id": np.asarray(chunk, dtype=object),
                "image": np.stack([images[sid] for sid in chunk]),
                "domain": np.asarray([given[sid] for sid in chunk], dtype=np.int64),
            }

    return source


def run_pass(stream, part, batch_size=5, seed=7):
    return [b.sample_ids for b in stream.shuffled(part, batch_size, torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("window", [64, 19])  # the shard has 19 rows: a part of exactly the window too
def test_a_part_within_the_window_is_shuffled_as_a_sorted_set_in_memory(window):
    given, images = make_rows(37)
    rows = rank_rows(given, 2, 0, 2)
    stream = RankStream(block_source(given, images, 8, seed=3), rows, torch.device("cpu"), window=window)
    expected_ids = sorted(rows.shard)
    plan = batches(torch.arange(len(expected_ids)), 5, torch.Generator().manual_seed(7))
    assert run_pass(stream, SHARD) == [[expected_ids[i] for i in index.tolist()] for index in plan]


@pytest.mark.parametrize("n,window,batch_size", [(100, 16, 5), (101, 10, 5), (53, 12, 4), (9, 8, 4)])
def test_a_windowed_pass_sees_every_row_once_in_the_planned_number_of_batches(n, window, batch_size):
    given, images = make_rows(n)
    rows = rank_rows(given, 2, 0, 1)
    stream = RankStream(block_source(given, images, 7), rows, torch.device("cpu"), window=window)
    for part in (SHARD, 0, 1):
        plan = list(stream.shuffled(part, batch_size, torch.Generator().manual_seed(1)))
        ids = [sid for b in plan for sid in b.sample_ids]
        assert sorted(ids) == sorted(stream.parts[part])
        assert len(plan) == batch_count(stream.size(part), batch_size)
        assert min(len(b) for b in plan) >= 2
        for b in plan:  # images and domains travel with their ids
            assert b.images[:, 0, 0, 0].tolist() == [int(images[sid][0, 0, 0]) for sid in b.sample_ids]
            assert b.domains.tolist() == [given[sid] for sid in b.sample_ids]


def test_a_windowed_pass_holds_about_a_window_before_its_first_batch():
    given, images = make_rows(400)
    seen: list[int] = []
    rows = rank_rows(given, 2, 0, 1)
    stream = RankStream(block_source(given, images, 10, seen=seen), rows, "cpu", 40, block_rows=10)
    first = next(stream.shuffled(SHARD, 4, torch.Generator().manual_seed(0)))
    assert len(first) == 4 and sum(seen) <= 40 + 10


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    given, images = make_rows(120)
    rows = rank_rows(given, 2, 1, 2)
    stream = RankStream(block_source(given, images, 9), rows, torch.device("cpu"), window=20)
    assert run_pass(stream, SHARD, seed=3) == run_pass(stream, SHARD, seed=3)
    assert run_pass(stream, SHARD, seed=3) != run_pass(stream, SHARD, seed=4)


@pytest.mark.parametrize("window", [16, 64])
def test_the_batches_do_not_depend_on_how_the_source_cuts_its_blocks(window):
    given, images = make_rows(300, num_domains=2)
    held = {sid: -1 for sid in list(given)[::7]}  # a held-out slice too
    given.update(held)
    rows = rank_rows(given, 2, 0, 2)  # rank 0 of 2: its shard, domain 0 and its held-out share
    for part in (SHARD, 0, HOLDOUT):  # the source's blocks also hold the other parts' rows
        passes = []
        for block in (1, 7, 13, 300):
            stream = RankStream(block_source(given, images, block), rows, "cpu", window, block_rows=10)
            passes.append(run_pass(stream, part, batch_size=4, seed=5))
        assert sorted(sid for b in passes[0] for sid in b) == sorted(stream.parts[part])
        assert all(p == passes[0] for p in passes[1:]), part


def test_the_source_is_asked_for_the_rows_of_the_part():
    given, images = make_rows(30)
    rows = rank_rows(given, 2, 0, 1)
    asked = []

    def source(members):
        asked.append(members)
        return block_source(given, images, 4)()

    stream = RankStream(source, rows, "cpu", 64)
    run_pass(stream, 1)
    assert asked == [frozenset(rows.domains[1])]


def test_ordered_gives_every_row_once_in_source_order():
    given, images = make_rows(50)
    stream = RankStream(block_source(given, images, 7, seed=1), rank_rows(given, 2, 0, 1), "cpu", 64)
    chunks = list(stream.ordered(0, size=4))
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 4, 4, 1]
    source_order = [str(s) for block in stream.source(None) for s in block["sample_id"] if given[str(s)] == 0]
    assert [sid for c in chunks for sid in c.sample_ids] == source_order


def test_the_cache_holds_each_rows_teacher_features():
    given, images = make_rows(30)
    stream = RankStream(block_source(given, images, 7, seed=2), rank_rows(given, 2, 0, 1), "cpu", 16)

    def teacher(x):
        return [x.mean(dim=1, keepdim=True), x * 2]

    stream.fill_cache(teacher)
    for batch in stream.shuffled(SHARD, 4, torch.Generator().manual_seed(0)):
        cached = stream.features(batch)
        expected = teacher(stream.images(batch))
        assert all(torch.equal(c, e) for c, e in zip(cached, expected, strict=True))


def test_the_cache_is_refused_above_its_budget_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="cdd_ray.train"):
        assert cache_decision(True, 1000, 2**20, 999.0, rank=1) == (False, 0.0)
        assert cache_decision(True, 1000, 2**20, 1000.0, rank=1) == (True, 1000.0)
        assert cache_decision(False, 10, 10, 1000.0, rank=1) == (False, 0.0)
        assert cache_decision(True, 10, 10, 1000.0, rank=1, augment="flips") == (False, 0.0)
    assert "1000 MiB exceeds train.teacher_cache_mb=999" in caplog.text
    assert "objective.augment=flips" in caplog.text
    assert "cache on" in caplog.text and "train.teacher_cache=false" in caplog.text


def test_the_target_cache_needs_room_beside_the_feature_cache(caplog):
    with caplog.at_level(logging.INFO, logger="cdd_ray.train"):
        assert target_cache_fits(600.0, 400.0, 1000.0, rank=0)
        assert not target_cache_fits(600.0, 401.0, 1000.0, rank=2)
    assert "target cache on: 400 MiB" in caplog.text
    assert "rank 2: pseudo-normal target cache off" in caplog.text and "1001 MiB" in caplog.text


def test_positions_are_those_the_parts_batches_carry():
    """The target cache of a worker holds its shard's positions only: they must be the positions its
    shard's batches carry (rank 0 of 2 owns domains whose rows reach past its shard)."""
    given, images = make_rows(30, num_domains=3)
    rows = rank_rows(given, 3, 0, 2)
    stream = RankStream(block_source(given, images, 7, seed=3), rows, "cpu", 16)
    assert rows.domains
    for part in (SHARD, *rows.domains):
        carried = torch.cat([b.positions for b in stream.ordered(part)])
        assert torch.equal(stream.positions(part), carried.sort().values)
    assert len(stream.positions(SHARD)) == 15 < stream.training_rows()
    with pytest.raises(ValueError, match="no cache positions for part 'holdout'"):
        stream.positions(HOLDOUT)


@pytest.mark.parametrize("rows", range(1, 40))
def test_batch_count_counts_what_batches_cuts(rows):
    assert batch_count(rows, 6) == len(batches(torch.arange(rows), 6, torch.Generator().manual_seed(0)))
