"""A real two-node Ray cluster on this machine: placement across nodes, shared storage, job submission.

Two `ray start --block` processes (loopback only, token authentication on, 1 CPU each plus a node
label resource) form the cluster; the test drives it through subprocesses (this process already
holds the session's Ray) and stops both nodes by their process ids, never with `ray stop`.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cdd_ray.train.checkpoint import load_domains, load_global
from cdd_ray.train.run import latest_checkpoint
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class TwoNodeCluster:
    def __init__(self, tmp: Path):
        self.token = secrets.token_hex(32)
        # Short temp dir: Ray's Unix socket paths must stay under ~107 characters.
        self.ray_tmp = tempfile.mkdtemp(prefix="cddmn")
        (gcs, dashboard, *agent_ports) = free_ports(2 + 8)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self.metrics_ports = [agent_ports[0], agent_ports[4]]
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "RAY_TMPDIR": self.ray_tmp,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_metrics_report_interval_ms": "500",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        }
        self.env.pop("RAY_ADDRESS", None)
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--block"]
        head = [
            "--head",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            '--resources={"node_head": 1}',
        ]
        worker = [f"--address={self.gcs_address}", '--resources={"node_second": 1}']
        self.logs = tmp / "nodes"
        self.logs.mkdir()
        self.nodes = []
        for name, extra, ports in (("head", head, agent_ports[:4]), ("second", worker, agent_ports[4:])):
            own_ports = [
                f"--metrics-export-port={ports[0]}",
                f"--dashboard-agent-listen-port={ports[1]}",
                f"--dashboard-agent-grpc-port={ports[2]}",
                f"--runtime-env-agent-port={ports[3]}",
            ]
            log = (self.logs / f"{name}.log").open("w")
            self.nodes.append(
                subprocess.Popen(
                    [str(BIN / "ray"), "start", *common, *extra, *own_ports],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            if name == "head":
                self.wait_for_nodes(1)
        self.wait_for_nodes(2)

    def run(self, args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        probe = (
            f"import ray; ray.init(address='{self.gcs_address}', logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.poll() is not None:
                    raise AssertionError(f"a Ray node exited: {self.log_tail()}")
            result = self.run([sys.executable, "-c", probe], timeout=60)
            if result.returncode == 0 and result.stdout.strip().endswith(str(count)):
                return
            time.sleep(1)
        raise AssertionError(f"{count} nodes never came up: {self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        for node in reversed(self.nodes):  # by process id: `ray start --block` tears its node down
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in self.nodes:
            try:
                # A test cluster in a temporary folder: no grace. `ray start --block` did not finish its
                # own teardown within 10 s of SIGTERM in any run here, so the kill came anyway.
                node.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=30)


@pytest.fixture
def two_nodes(tmp_path):
    cluster = TwoNodeCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def scrape(ports: list[int]) -> str:
    text = ""
    for port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                text += response.read().decode()
        except OSError:
            pass
    return text


def test_two_nodes_spread_domain_students_and_run_a_token_authenticated_job(two_nodes, tiny_store, tmp_path):
    # Storage both nodes share: one machine's file system stands in for NFS here.
    storage = tmp_path / "shared-runs"
    overrides = tiny_overrides(
        tiny_store,
        storage,
        **{
            "name": "spread",
            "train.num_domains": 2,
            "train.epochs": 3,
            "ray.num_workers": 2,
            "ray.cpus_per_worker": 1,
            "ray.placement_strategy": "SPREAD",
            "eval.score_test": "false",
        },
    )
    train = subprocess.Popen(
        [sys.executable, "-m", "cdd_ray.cli", "train", *overrides],
        env={**two_nodes.env, "RAY_ADDRESS": two_nodes.gcs_address},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The gauges are live while the run trains. With the `sequential` schedule the domain losses are
    # exported during the DST epochs and the global loss afterwards, so keep every cdd-ray line seen.
    seen_metrics = ""
    while train.poll() is None:
        if "cdd_ray_loss_global" not in seen_metrics or "cdd_ray_loss_domain" not in seen_metrics:
            lines = scrape(two_nodes.metrics_ports).splitlines()
            seen_metrics += "".join(line + "\n" for line in lines if "cdd_ray_" in line)
        time.sleep(0.5)
    output = train.stdout.read()
    assert train.returncode == 0, output[-4000:] + two_nodes.log_tail()

    run_dir = storage / "spread"
    workers = json.loads((run_dir / "workers.json").read_text())["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert [w["domains"] for w in workers] == [[0], [1]]
    assert workers[0]["node_id"] != workers[1]["node_id"], "both domain students trained on one node"
    checkpoint = latest_checkpoint(run_dir)
    students, _ = load_domains(checkpoint)  # each node wrote its own domain file into the shared run
    assert sorted(students) == [0, 1] and load_global(checkpoint)["epoch"] == 3
    for expected in ('run="spread"', "cdd_ray_loss_domain", "cdd_ray_loss_global"):
        assert expected in seen_metrics, seen_metrics[-2000:]

    # Job submission through the dashboard's job API, with the token; and refused without it.
    out = tmp_path / "job-store"
    submit = two_nodes.run(
        [
            str(BIN / "cdd-ray"),
            "submit",
            "--address",
            two_nodes.dashboard_url,
            "--follow",
            "--job-id",
            "cdd-multinode-test",
            "--",
            "prepare",
            "synthetic",
            "--out",
            str(out),
            "--category",
            "pill",
            "--image-size",
            "16",
        ],
        timeout=300,
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert "job id: cdd-multinode-test" in submit.stdout and "SUCCEEDED" in submit.stdout
    assert "store written to" in submit.stdout  # the job's own output, streamed back
    assert json.loads((out / "store.json").read_text())["counts"]

    status = two_nodes.run(
        [str(BIN / "ray"), "job", "status", "cdd-multinode-test", "--address", two_nodes.dashboard_url],
        timeout=60,
    )
    assert "succeeded" in (status.stdout + status.stderr).lower()
    no_token = {k: v for k, v in two_nodes.env.items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", two_nodes.dashboard_url],
        env={**no_token, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": "wrong-" + secrets.token_hex(8)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "cdd-multinode-test" not in refused.stdout
