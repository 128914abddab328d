"""Which training rows each Ray Train rank reads, decided by sample id alone.

A run of W ranks and K domains gives rank r:

- its **shard** of the global student's data: every W-th id of the trained ids sorted as strings,
  starting at r (sizes differ by at most one, so DDP's equal step counts cost at most one batch);
- the rows of every **domain it owns** (domain k lives on rank ``k % W``, as
  ``cdd_ray.train.exchange.owner_of``), for the domain students (none when K = 1);
- its share of the **held-out** ids (every W-th of them sorted), for the label-free proxy.

The driver reads one Ray Data dataset per rank with exactly those rows (``rank_dataset_name``), so
a worker never receives another rank's images, the rows that both a shard and a domain need are
stored once, and the object store holds at most about two copies of the set whatever K is.
Nothing depends on which block reached which worker first: a restarted or repeated run gets the
same rows on the same rank.

Example::

    rows = rank_rows(manifest["assignment"], num_domains=2, rank=1, world_size=2)
    rows.shard[:3], sorted(rows.domains), len(rows.holdout)
"""

from __future__ import annotations

from dataclasses import dataclass

from cdd_ray.data.domains import HOLDOUT


def owner_of(domain: int, world_size: int) -> int:
    """The rank that trains domain ``domain``'s student."""
    return domain % world_size


@dataclass(frozen=True)
class RankRows:
    """The sample ids one rank reads: ``shard`` (global student), ``domains`` (owned domain ->
    ids; empty when K = 1) and ``holdout``; every tuple is sorted."""

    rank: int
    world_size: int
    shard: tuple[str, ...]
    domains: dict[int, tuple[str, ...]]
    holdout: tuple[str, ...]

    def ids(self) -> frozenset[str]:
        """Every id this rank reads (each once, however many roles it has)."""
        return frozenset(self.shard).union(self.holdout, *self.domains.values())


def trained_ids(assignment: dict[str, int]) -> list[str]:
    """The ids a run trained on (every id of ``assignment`` not held out), sorted as strings."""
    return sorted(sid for sid, domain in assignment.items() if domain != HOLDOUT)


def rank_rows(assignment: dict[str, int], num_domains: int, rank: int, world_size: int) -> RankRows:
    """The rows of rank ``rank`` of ``world_size`` from a domain assignment (sample id -> domain in
    [0, num_domains), ``HOLDOUT`` = -1 for held-out ids; ``domains.json``'s ``assignment``).

    Raises ValueError for a rank outside [0, world_size)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size} workers")
    trained = trained_ids(assignment)
    held = sorted(sid for sid, domain in assignment.items() if domain == HOLDOUT)
    owned = [k for k in range(num_domains) if owner_of(k, world_size) == rank] if num_domains > 1 else []
    return RankRows(
        rank=rank,
        world_size=world_size,
        shard=tuple(trained[rank::world_size]),
        domains={k: tuple(sid for sid in trained if assignment[sid] == k) for k in owned},
        holdout=tuple(held[rank::world_size]),
    )


def rank_dataset_name(rank: int) -> str:
    """The name under which the driver hands rank ``rank`` its dataset (``train_<rank>``)."""
    return f"train_{rank}"
