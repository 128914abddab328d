"""Live training metrics for the Ray dashboard and Prometheus (``ray.util.metrics`` gauges).

Each worker sets, after every step, gauges tagged with the run name and its rank; Ray's metrics
agent exports them (Prometheus names get Ray's ``ray_`` prefix: ``ray_cdd_ray_loss_global``, ...),
so the dashboard's Metrics view or Grafana shows a run's losses and throughput while it trains,
besides the Train reports (progress.jsonl).

Gauges:
- ``cdd_ray_loss_domain``   {run, domain}: mean DST loss of domain k in the last step
- ``cdd_ray_loss_global``   {run}: mean aggregation (global student) loss
- ``cdd_ray_proxy_loss``    {run}: label-free held-out proxy, when a held-out share exists
- ``cdd_ray_images_per_second`` {run, rank}: this worker's throughput in the last step
- ``cdd_ray_epoch``         {run}: the epoch just finished
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ray.util import metrics as ray_metrics


class GaugeLike(Protocol):
    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...


GAUGES = {
    "cdd_ray_loss_domain": ("mean DST loss of one domain student in the last step", ("run", "domain")),
    "cdd_ray_loss_global": ("mean loss of the global student in the last step", ("run",)),
    "cdd_ray_proxy_loss": ("label-free held-out proxy after the last step", ("run",)),
    "cdd_ray_images_per_second": ("images per second of one worker in the last step", ("run", "rank")),
    "cdd_ray_epoch": ("epoch just finished", ("run",)),
}


def ray_gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> GaugeLike:
    return ray_metrics.Gauge(name, description=description, tag_keys=tag_keys)


class RunGauges:
    """The gauges of one run as seen from one rank; ``update`` takes a step's reported metrics."""

    def __init__(self, run: str, rank: int, factory: Callable[..., GaugeLike] = ray_gauge):
        self.run, self.rank = run, rank
        self.gauges = {name: factory(name, description, tags) for name, (description, tags) in GAUGES.items()}

    def update(self, metrics: dict[str, float]) -> None:
        run = {"run": self.run}
        if "images_per_second_per_worker" in metrics:
            tags = {**run, "rank": str(self.rank)}
            self.gauges["cdd_ray_images_per_second"].set(metrics["images_per_second_per_worker"], tags)
        if self.rank != 0:  # losses are gathered, the same on every rank: one series, not W copies
            return
        for key, value in metrics.items():
            if key.startswith("loss_domain_"):
                self.gauges["cdd_ray_loss_domain"].set(
                    value, {**run, "domain": key.removeprefix("loss_domain_")}
                )
        for key, gauge in (("loss_global", "cdd_ray_loss_global"), ("proxy_loss", "cdd_ray_proxy_loss")):
            if key in metrics:
                self.gauges[gauge].set(metrics[key], run)
        if "epoch" in metrics:
            self.gauges["cdd_ray_epoch"].set(metrics["epoch"], run)
