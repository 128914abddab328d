"""A real two-node Ray cluster on this machine: placement across nodes, shared storage, a killed
driver resumed, a lost worker restarted, job submission.

Two `ray start --block` processes (loopback only, token authentication on, 2 CPUs each plus a node
label resource) form the cluster; the test drives it through subprocesses (this process already
holds the session's Ray) and stops both nodes by their process ids, never with `ray stop`.
"""

import json
import os
import re
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

from cdd_ray.evaluate.scoring import METRICS_FILE
from cdd_ray.ray_session import LOG_FILE
from cdd_ray.train.checkpoint import load_domains, load_global
from cdd_ray.train.run import FAULT_ENV, PROGRESS_FILE, TRACE_ENV, latest_checkpoint
from tests.conftest import TWO_WORKER_RUN, tiny_overrides
from tests.test_interrupts import epochs_reported, wait_for
from tests.train.test_distributed import read_trace
from tests.train.test_faults import assert_same_weights, checkpoint_epochs

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
        # 2 CPUs per node: both 1-CPU workers fit on one node, so only SPREAD puts them on two
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--block"]
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


class Gauges:
    """The cdd-ray lines of both nodes' metrics endpoints, kept from every scrape: with `alternate`
    both losses are exported each epoch, but only while a run trains."""

    def __init__(self, ports: list[int]):
        self.ports, self.seen = ports, ""

    def scrape(self) -> None:
        if "cdd_ray_loss_global" not in self.seen or "cdd_ray_loss_domain" not in self.seen:
            lines = scrape(self.ports).splitlines()
            self.seen += "".join(line + "\n" for line in lines if "cdd_ray_" in line)


def test_two_nodes_spread_domain_students_survive_a_killed_driver_and_a_lost_worker_then_run_a_job(
    two_worker_run, two_nodes, tiny_store, tmp_path
):  # the reference run first: it uses the session's Ray, not the two nodes
    """One run on two nodes, interrupted twice, ends with the weights of the uninterrupted run:

    1. rank 1's process exits mid-epoch 2: Ray Train restarts the worker group from the last
       checkpoint this fit reported (epoch 1), and step 1 runs again;
    2. the attached driver is then SIGKILLed mid-epoch 2 (as when a login node or laptop dies):
       its Train controller and workers go with it; the same command resumes from epoch 1.
    """
    _, _, ref_checkpoint, ref_metrics, _ = two_worker_run  # the same settings, never interrupted
    # Storage both nodes share: one machine's file system stands in for NFS here.
    storage = tmp_path / "shared-runs"
    overrides = {**TWO_WORKER_RUN, "ray.cpus_per_worker": 1, "ray.placement_strategy": "SPREAD"}
    command = [
        sys.executable,
        "-m",
        "cdd_ray.cli",
        "train",
        *tiny_overrides(tiny_store, storage, name="spread", **overrides),
    ]
    env = {**two_nodes.env, "RAY_ADDRESS": two_nodes.gcs_address}
    run_dir = storage / "spread"
    gauges = Gauges(two_nodes.metrics_ports)

    # Epoch 2's aggregation (step 1, after epoch 1's checkpoint): rank 1 exits before its batch 1,
    # and Ray Train restarts the group from that checkpoint, reported in this same fit; rank 0 then
    # stalls at batch 0 of the restarted step (only after the exit: its `after` marker), and the
    # driver is killed there.
    exited, stalled, trace = tmp_path / "exited", tmp_path / "stalled", tmp_path / "trace"
    faults = [
        {"action": "exit", "rank": 1, "stage": "global", "step": 1, "batch": 1, "marker": str(exited)},
        {
            "action": "stall",
            "seconds": 300,
            "rank": 0,
            "stage": "global",
            "step": 1,
            "batch": 0,
            "marker": str(stalled),
            "after": str(exited),
        },
    ]
    first_env = {**env, FAULT_ENV: json.dumps(faults), TRACE_ENV: str(trace)}
    with subprocess.Popen(
        command, env=first_env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    ) as first:

        def stalled_after_the_restart() -> bool:
            return stalled.exists() and epochs_reported(run_dir) == [1]

        wait_for(stalled_after_the_restart, 600, first, "the restart and the stall", tick=gauges.scrape)
        first.kill()  # SIGKILL: no handler, no cleanup
    assert exited.is_file(), "the worker fault never fired"
    events = read_trace(trace)
    # the batches of step 1 that ran before the exit ran again after it, on both ranks
    for rank, stage in ((0, "dst"), (1, "global")):
        seen = [e for e in events if e["rank"] == rank and e["step"] == 1 and e["stage"] == stage]
        assert len(seen) > len({tuple(e["sample_ids"]) for e in seen}), f"step 1 did not restart ({rank})"
    assert load_global(latest_checkpoint(run_dir))["epoch"] == 1

    # The same command, no fault: it resumes from epoch 1 and trains epoch 2.
    console_file = tmp_path / "console.txt"  # a file, not a pipe: a long traceback cannot block it
    with (
        console_file.open("w") as sink,
        subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT) as again,
    ):
        wait_for(lambda: again.poll() is not None, 600, again, "the resumed run to end", tick=gauges.scrape)
    output = console_file.read_text()
    assert again.returncode == 0, output[-4000:] + two_nodes.log_tail()
    assert epochs_reported(run_dir) == [1, 2], "the second command did not continue from epoch 1"
    assert checkpoint_epochs(run_dir) == [1, 2]
    # Quiet by default: Ray's and the workers' lines go to the run's log file, not to the console.
    console = output.splitlines()
    ray_pattern = re.compile(r"\bINFO\b|\(RayTrainWorker|\(pid=|TrainingReport\(")
    ray_lines = [line for line in console if ray_pattern.search(line)]
    assert not ray_lines and len(console) <= 24, "\n".join(console)
    assert "INFO" in (run_dir / LOG_FILE).read_text()

    # Each node wrote its own domain file into the shared run (K = 3 round robin on 2 workers).
    workers = json.loads((run_dir / "workers.json").read_text())["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert [w["domains"] for w in workers] == [[0, 2], [1]]
    assert workers[0]["node_id"] != workers[1]["node_id"], "both ranks trained on one node"
    checkpoint = latest_checkpoint(run_dir)
    assert load_global(checkpoint)["epoch"] == 2
    # Fixed seed, CPU, one torch thread per worker: killed, resumed, restarted and spread over two
    # nodes, the run is the uninterrupted one, weight for weight (EMA included).
    for key in ("global_student", "global_ema", "evaluation_student"):
        assert_same_weights(load_global(checkpoint)[key], load_global(ref_checkpoint)[key])
    students, _ = load_domains(checkpoint)
    ref_students, _ = load_domains(ref_checkpoint)
    assert sorted(students) == [0, 1, 2]
    for k in (0, 1, 2):
        assert_same_weights(students[k], ref_students[k])
    last = json.loads((run_dir / PROGRESS_FILE).read_text().splitlines()[-1])
    assert last["loss_global"] == pytest.approx(ref_metrics["loss_global"], abs=1e-6)
    written = json.loads((run_dir / METRICS_FILE).read_text())
    assert written["image_auroc"] == pytest.approx(ref_metrics["image_auroc"], abs=1e-9)
    for expected in ('run="spread"', "cdd_ray_loss_domain", "cdd_ray_loss_global"):
        assert expected in gauges.seen, gauges.seen[-2000:]

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
