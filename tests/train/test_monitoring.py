"""The dashboard gauges: which series a step's metrics set, and from which rank."""

from cdd_ray.train.monitoring import GAUGES, RunGauges

STEP = {
    "epoch": 3,
    "loss_domain_0": 0.5,
    "loss_domain_1": 0.7,
    "loss_global": 1.25,
    "proxy_loss": 0.9,
    "images_per_second_per_worker": 40.0,
    "stage": "dst+global",
}


class Recorder:
    def __init__(self, log: list, name: str, description: str, tag_keys: tuple[str, ...]):
        self.log, self.name, self.tag_keys = log, name, tag_keys
        assert description

    def set(self, value, tags=None):
        assert set(tags) == set(self.tag_keys), f"{self.name}: tags {tags} vs declared {self.tag_keys}"
        self.log.append((self.name, tuple(sorted(tags.items())), value))


def recorded(rank: int) -> list:
    log: list = []
    RunGauges("weave-cdd-k2-noise0.1-seed0", rank, lambda *a: Recorder(log, *a)).update(STEP)
    return log


def test_rank_zero_sets_every_loss_and_each_rank_its_own_throughput():
    run = ("run", "weave-cdd-k2-noise0.1-seed0")
    assert sorted(recorded(0)) == sorted(
        [
            ("cdd_ray_epoch", (run,), 3),
            ("cdd_ray_loss_domain", (("domain", "0"), run), 0.5),
            ("cdd_ray_loss_domain", (("domain", "1"), run), 0.7),
            ("cdd_ray_loss_global", (run,), 1.25),
            ("cdd_ray_proxy_loss", (run,), 0.9),
            ("cdd_ray_images_per_second", (("rank", "0"), run), 40.0),
        ]
    )
    assert recorded(1) == [("cdd_ray_images_per_second", (("rank", "1"), run), 40.0)]
    assert {name for name, _, _ in recorded(0)} == set(GAUGES)
