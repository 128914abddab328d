"""Which rows each rank reads: by sample id only, every trained row in one shard, domains on their owner."""

import random

import pytest

from cdd_ray.data.domains import HOLDOUT
from cdd_ray.data.sharding import owner_of, rank_rows


def assignment(n: int = 23, num_domains: int = 3, held: int = 5) -> dict[str, int]:
    ids = [f"s{i:03d}" for i in range(n)]
    return {sid: (HOLDOUT if i < held else i % num_domains) for i, sid in enumerate(ids)}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_row_has_its_place(world_size):
    given = assignment()
    trained = sorted(sid for sid, d in given.items() if d != HOLDOUT)
    ranks = [rank_rows(given, 3, r, world_size) for r in range(world_size)]
    shards = [set(r.shard) for r in ranks]
    assert set().union(*shards) == set(trained) and sum(map(len, shards)) == len(trained)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    held = [set(r.holdout) for r in ranks]
    assert set().union(*held) == {sid for sid, d in given.items() if d == HOLDOUT}
    assert sum(map(len, held)) == 5
    for k in range(3):
        owner = ranks[owner_of(k, world_size)]
        assert set(owner.domains[k]) == {sid for sid in trained if given[sid] == k}
        assert all(k not in r.domains for r in ranks if r.rank != owner.rank)
    for r in ranks:
        assert r.ids() == set(r.shard) | set(r.holdout) | set().union(*map(set, r.domains.values()))


def test_rows_depend_on_ids_not_on_order():
    given = assignment()
    items = list(given.items())
    random.Random(4).shuffle(items)
    assert rank_rows(dict(items), 3, 1, 2) == rank_rows(given, 3, 1, 2)


def test_a_single_domain_has_no_domain_students():
    rows = rank_rows(assignment(num_domains=1), 1, 0, 2)
    assert rows.domains == {}


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        rank_rows(assignment(), 3, 2, 2)
