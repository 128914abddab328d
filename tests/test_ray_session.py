"""Bounded waits and clear refusals before Ray is reached: addresses and resources."""

import os
import socket
import subprocess
import sys
import time

import pytest

from cdd_ray.cli import main
from cdd_ray.ray_session import (
    CONNECT_TIMEOUT_ENV,
    CONNECT_TIMEOUT_S,
    RayAddressError,
    ResourcesError,
    check_address,
    check_resources,
    connect_timeout_s,
)
from tests.conftest import tiny_overrides


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_http_ray_address_is_explained():
    with pytest.raises(RayAddressError, match=r"RAY_ADDRESS=http://10.0.0.1:8265 .*cdd-ray submit --address"):
        check_address("http://10.0.0.1:8265")


def test_an_address_where_nothing_listens_fails_within_the_bound():
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(RayAddressError, match=f"nothing answers at RAY_ADDRESS={address}"):
        check_address(address, timeout_s=1.0)
    assert time.monotonic() - started < 5


def test_the_connect_bound_comes_from_the_environment_and_a_bad_one_is_named(monkeypatch):
    monkeypatch.delenv(CONNECT_TIMEOUT_ENV, raising=False)
    assert connect_timeout_s() == CONNECT_TIMEOUT_S
    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, "1.5")
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(RayAddressError, match=r"for 2 s"):  # 1.5 s, printed to the second
        check_address(address)
    assert 1.4 < time.monotonic() - started < 5
    for bad in ("0", "-3", "soon", "inf", "nan"):
        monkeypatch.setenv(CONNECT_TIMEOUT_ENV, bad)
        with pytest.raises(RayAddressError, match=f"{CONNECT_TIMEOUT_ENV}='{bad}': must be a positive"):
            connect_timeout_s()


def test_train_with_a_dead_ray_address_exits_2_naming_it(tiny_store, tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    # a 1 s bound (the default 10 s is tested above through connect_timeout_s)
    env = {**os.environ, "RAY_ADDRESS": address, CONNECT_TIMEOUT_ENV: "1"}
    command = [sys.executable, "-m", "cdd_ray.cli", "train", *tiny_overrides(tiny_store, tmp_path / "runs")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    printed = done.stdout.replace("\n", "")
    assert f"RAY_ADDRESS={address}" in printed and "for 1 s" in printed and CONNECT_TIMEOUT_ENV in printed


def test_more_workers_than_a_local_ray_has_is_refused_naming_the_settings():
    with pytest.raises(
        ResourcesError, match=r"ray.num_workers=4 x ray.cpus_per_worker=1 = 4 CPUs, the cluster has 2"
    ):
        check_resources(4, 1.0, False, cpus=2, gpus=0, can_grow=False)
    warning = check_resources(4, 1.0, False, cpus=2, gpus=0, can_grow=True)
    assert warning and "autoscaler" in warning
    assert check_resources(2, 1.0, False, cpus=2, gpus=0, can_grow=False) is None
    assert check_resources(0, 8.0, False, cpus=2, gpus=0, can_grow=False) is None
    with pytest.raises(ResourcesError, match="GPU workers, the cluster has 0 GPUs"):
        check_resources(1, 1.0, True, cpus=2, gpus=0, can_grow=False)


def test_dry_run_refuses_more_workers_than_this_machine_has(tiny_store, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    workers = (os.cpu_count() or 1) + 1
    args = tiny_overrides(
        tiny_store, tmp_path / "runs", **{"ray.num_workers": workers, "ray.cpus_per_worker": 1}
    )
    assert main(["train", "--dry-run", *args]) == 2
    assert f"ray.num_workers={workers} x ray.cpus_per_worker=1" in capsys.readouterr().out.replace("\n", "")
