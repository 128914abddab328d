"""Connecting to Ray: an existing cluster when RAY_ADDRESS is set, else a local Ray started on demand.

The local Ray binds its dashboard to 127.0.0.1 and keeps Ray's token authentication as configured
(on by default since Ray 2.59). ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is lowered before a local
start, since with the default each ``ray.train.report`` can block ~1.8 s (see ENVIRONMENT.md).

Nothing here waits forever: a RAY_ADDRESS where nothing listens fails after ``CONNECT_TIMEOUT_S``
(10 s; ``CDD_RAY_CONNECT_TIMEOUT_S`` sets another bound, e.g. for a head node still booting;
``ray.init`` alone would retry for ever), an HTTP RAY_ADDRESS (the dashboard's job address, which
``ray.init`` cannot use) is explained, and a run that asks for more CPUs or GPUs than a local Ray
has is refused at once (a local Ray never grows; Ray Train would wait for ever).

Example::

    dashboard_url = ensure_ray()
    check_resources(config.ray)      # raises ResourcesError before a run that could never start
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from pathlib import Path

import ray

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
CONNECT_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_ENV = "CDD_RAY_CONNECT_TIMEOUT_S"

_dashboard_url: str | None = None
_started_here = False
_verbose = False
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
LOG_FILE = "ray.log"


def set_verbose(verbose: bool) -> None:
    """``-v``: Ray's INFO lines, deprecation warnings and the workers' output back on the console.
    Quiet (the default) leaves cdd-ray's own progress and tables; Ray's lines go to the run's
    ``ray.log`` (``log_to_file``) and, as always, to Ray's session logs and the dashboard."""
    global _verbose
    _verbose = verbose
    level = logging.INFO if verbose else logging.WARNING
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=r"ray(\.|$)")


def verbose() -> bool:
    return _verbose


def log_to_file(directory: Path) -> logging.Handler:
    """Copy Ray's log lines (at INFO and above) of this process into ``directory/ray.log``."""
    handler = logging.FileHandler(Path(directory) / LOG_FILE)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if not _verbose:  # the console keeps WARNING; the file gets INFO
            logger.setLevel(logging.INFO)
            for console_handler in logger.handlers:
                if console_handler is not handler and not isinstance(console_handler, logging.FileHandler):
                    console_handler.setLevel(logging.WARNING)
    return handler


class RayAddressError(ConnectionError):
    """RAY_ADDRESS cannot be used; the message names it and what was tried."""


class ResourcesError(ValueError):
    """A run asks for more than the cluster has and can get; the message names the settings."""


def _host_port(address: str) -> tuple[str, int] | None:
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() else None


def connect_timeout_s() -> float:
    """The bound, in seconds, of the wait for a RAY_ADDRESS to answer: ``CDD_RAY_CONNECT_TIMEOUT_S``
    when set, else ``CONNECT_TIMEOUT_S``. Raises RayAddressError naming the variable for a value
    that is not a positive number."""
    text = os.environ.get(CONNECT_TIMEOUT_ENV)
    if text is None:
        return CONNECT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise RayAddressError(f"{CONNECT_TIMEOUT_ENV}={text!r}: must be a positive number of seconds")
    return value


def check_address(address: str, timeout_s: float | None = None) -> None:
    """Refuse an HTTP address, and fail within ``timeout_s`` (default ``connect_timeout_s()``) when
    nothing listens at host:port."""
    if address.startswith(("http://", "https://")):
        raise RayAddressError(
            f"RAY_ADDRESS={address} is an HTTP address: that is a cluster's dashboard and job API, "
            f"which `cdd-ray submit --address {address} -- train ...` uses. A driver needs the cluster's "
            "GCS address (host:6379), a Ray Client address (ray://host:10001) or `auto`; unset "
            "RAY_ADDRESS to start a local Ray"
        )
    target = _host_port(address)
    if target is None:  # "auto", "local": Ray resolves those itself
        return
    timeout_s = connect_timeout_s() if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            attempt = min(2.0, max(0.1, deadline - time.monotonic()))
            with socket.create_connection(target, timeout=attempt):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise RayAddressError(
                    f"nothing answers at RAY_ADDRESS={address} (tried to connect to {target[0]}:{target[1]} "
                    f"for {timeout_s:.0f} s: {error}); is the cluster running? Unset RAY_ADDRESS to "
                    f"start a local Ray instead, or set {CONNECT_TIMEOUT_ENV} to wait longer"
                ) from error
            time.sleep(0.5)


def ensure_ray(num_cpus: int | None = None) -> str | None:
    """Initialize Ray once; returns the dashboard URL when a dashboard runs."""
    global _dashboard_url, _started_here
    # Per process (the driver, and Tune trials that run cdd-ray inside Ray): Ray Data's progress
    # bars garble the rich progress and the logs.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if not _verbose:  # Ray Data's note that its bars are off (our choice) is not news to a user
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray 2.60's default Parquet reader (DataSource V2: a ListFiles task, then read tasks aimed at
    # 200 blocks) takes ~5 s to read one small store file here where the V1 reader takes 0.3 s
    # (measured on the 2-core machine, BENCHMARKS.md "fixed cost"); a store is one Parquet file.
    context.use_datasource_v2 = False
    if ray.is_initialized():
        return _dashboard_url
    if os.environ.get("RAY_ADDRESS"):
        check_address(os.environ["RAY_ADDRESS"])
        info = ray.init(
            address=os.environ["RAY_ADDRESS"],
            log_to_driver=_verbose,
            logging_level=logging.INFO if _verbose else logging.WARNING,
        )
    else:
        os.environ.setdefault(HEALTH_CHECK_ENV, "0.2")
        info = ray.init(
            num_cpus=num_cpus,
            include_dashboard=os.environ.get("CDD_RAY_DASHBOARD", "1") != "0",
            dashboard_host="127.0.0.1",
            log_to_driver=_verbose,  # the workers' output stays in Ray's logs and the dashboard
            logging_level=logging.INFO if _verbose else logging.WARNING,
        )
        _started_here = True
    url = info.dashboard_url
    _dashboard_url = f"http://{url}" if url and not url.startswith("http") else (url or None)
    return _dashboard_url


def check_resources(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    cpus: float | None = None,
    gpus: float | None = None,
    can_grow: bool | None = None,
) -> str | None:
    """Refuse a run that asks for more CPUs (or GPUs) than the cluster has and cannot grow to.

    Defaults describe the connected Ray (a local Ray started here cannot grow; a cluster reached
    through RAY_ADDRESS may autoscale, so there it is a warning). Returns the warning, if any;
    raises ResourcesError naming ``ray.num_workers`` x ``ray.cpus_per_worker`` and what exists."""
    if num_workers == 0:
        return None
    if cpus is None:
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    can_grow = (not _started_here) if can_grow is None else can_grow
    needed_cpus = num_workers * cpus_per_worker
    problems = []
    if needed_cpus > cpus + 1e-9:
        problems.append(
            f"ray.num_workers={num_workers} x ray.cpus_per_worker={cpus_per_worker:g} = "
            f"{needed_cpus:g} CPUs, the cluster has {cpus:g} (lower ray.num_workers, or "
            f"ray.cpus_per_worker to {math.floor(cpus / num_workers * 100) / 100:g})"
        )
    if use_gpu and num_workers > (gpus or 0):
        problems.append(f"ray.num_workers={num_workers} GPU workers, the cluster has {gpus or 0:g} GPUs")
    if not problems:
        return None
    message = "; ".join(problems)
    if not can_grow:
        raise ResourcesError(f"{message}; a local Ray does not grow, so the run could never start")
    return f"{message}; waiting for the cluster's autoscaler to add nodes"


def cluster_has_gpus(use_gpu: bool | None) -> bool:
    """``ray.use_gpu``: true/false as set, or (None) whether the cluster has GPUs at all. The driver's
    own machine says nothing: on a cluster the head node often has no GPU while workers do."""
    if use_gpu is not None:
        return use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0
