"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set, else a local Ray started on demand.

The local Ray binds its dashboard to 127.0.0.1 and keeps Ray's token authentication as configured
(on by default since Ray 2.59). ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is lowered before a local
start, since with the default each ``ray.train.report`` can block ~1.8 s (see ENVIRONMENT.md).

Example::

    dashboard_url = ensure_ray()
"""

from __future__ import annotations

import os

import ray

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


_dashboard_url: str | None = None


def ensure_ray(num_cpus: int | None = None) -> str | None:
    """Initialize Ray once; returns the dashboard URL when a dashboard runs."""
    global _dashboard_url
    # Per process (the driver, and Tune trials that run cdd-ray inside Ray): Ray Data's progress
    # bars garble the rich progress and the logs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return _dashboard_url
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        os.environ.setdefault(HEALTH_CHECK_ENV, "0.2")
        context = ray.init(
            num_cpus=num_cpus,
            include_dashboard=os.environ.get("CDD_RAY_DASHBOARD", "1") != "0",
            dashboard_host="127.0.0.1",
        )
    url = context.dashboard_url
    _dashboard_url = f"http://{url}" if url and not url.startswith("http") else (url or None)
    return _dashboard_url


def cluster_has_gpus(use_gpu: bool | None) -> bool:
    """``ray.use_gpu``: true/false as set, or (None) whether the cluster has GPUs at all. The driver's
    own machine says nothing: on a cluster the head node often has no GPU while workers do."""
    if use_gpu is not None:
        return use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0
