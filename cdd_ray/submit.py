"""`cdd-ray submit`: run a cdd-ray command as a Ray job on a cluster (the `ray job submit` path).

The job's entrypoint is the cdd-ray command itself; the local checkout travels as the job's
working_dir (so the cluster runs the code you have, on the packages its image pins), and the job id
says what runs: ``cdd-train-weave-cdd-k3-seed0-20261128-153000``.

The command checks the inner cdd-ray command first (arguments, config keys and values), so a typo
fails here in a second instead of on the cluster after a queue wait. Token authentication: the Ray
client sends the token it finds in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (see
cluster/README.md); nothing here handles or prints it.

Example::

    cdd-ray submit --address http://127.0.0.1:8265 -- train --config cluster/configs/mvtec_cdd.yaml
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from pathlib import Path

# Paths a job's working_dir never needs: environments, outputs, data, VCS.
WORKING_DIR_EXCLUDES = [
    "/.git",
    "/.venv",
    "**/__pycache__",
    "/runs",
    "/demo_out",
    "/grids_out",
    "/sweeps_out",
    "/bench_out",
    "/data",
    "*.pt",
    "*.parquet",
]
JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def describe(inner: argparse.Namespace) -> str:
    """What the inner command runs, for the job id: command, category, method, K, seed."""
    command = inner.command
    if command == "train":
        from cdd_ray.config import load_config

        config = load_config(inner.config, inner.overrides)
        if config.name:
            return f"train-{config.name}"
        method = "rd" if config.train.num_domains == 1 else f"cdd-k{config.train.num_domains}"
        return f"train-{config.data.category or 'all'}-{method}-seed{config.train.seed}"
    if command in ("sweep", "grid"):
        return f"{command}-{Path(inner.spec).stem}"
    return command


def submission_id(description: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"cdd-{description}-{stamp}")


def job_request(
    inner_args: list[str], inner: argparse.Namespace, working_dir: Path, job_id: str | None
) -> dict:
    """The keyword arguments of JobSubmissionClient.submit_job for this cdd-ray command."""
    import shlex

    return {
        "entrypoint": shlex.join(["cdd-ray", *inner_args]),
        "submission_id": job_id or submission_id(describe(inner)),
        "runtime_env": {
            "working_dir": str(working_dir),
            "excludes": WORKING_DIR_EXCLUDES,
            "env_vars": JOB_ENV,
        },
        "metadata": {"tool": "cdd-ray", "command": inner.command},
    }


def follow_instructions(address: str, job_id: str) -> list[str]:
    return [
        f"job id: {job_id}",
        f"follow logs:  ray job logs --follow {job_id} --address {address}",
        f"status:       ray job status {job_id} --address {address}",
        f"stop:         ray job stop {job_id} --address {address}",
        f"dashboard:    {address}/#/jobs/{job_id} (through `ray dashboard CLUSTER.yaml` or an SSH tunnel;"
        " never expose port 8265)",
    ]


# Ray's job API answers HTTP 500 "No available agent to submit job, please try again later." while
# the dashboard cannot reach a node's job agent (a cluster just started, or a loaded head node); the
# head holds each such request about 10 s first. Under Python < 3.11 on the head the same wait ends
# in "Failed to get head node agent within 10 seconds" instead.
AGENT_BUSY = ("No available agent to submit job", "Failed to get head node agent")
AGENT_WAIT_S = 120.0
END_WAIT_S = 60.0


class SubmitError(RuntimeError):
    """The cluster did not take the job, or did not report its end, within the bounded wait."""


def submit_with_retry(
    client,
    request: dict,
    address: str,
    wait_s: float = AGENT_WAIT_S,
    poll_s: float = 2.0,
    say: Callable[[str], None] = print,
) -> str:
    """``client.submit_job(**request)``, tried again while Ray answers that no job agent is available.

    The same submission id is resent. When a busy answer came after the agent had in fact started
    the job, the next try is refused as "already exists": that job is this one, and its id is
    returned. Any other error is raised at once. Raises SubmitError naming the address when busy
    answers go on past ``wait_s`` seconds (each answer itself may take ~10 s, so the last try can
    end up to that much later). ``say`` gets one line when the first busy answer comes.
    """
    deadline = time.monotonic() + wait_s
    busy = False
    while True:
        try:
            return client.submit_job(**request)
        except RuntimeError as error:
            text = str(error)
            if busy and "already exists" in text and request["submission_id"] in text:
                return request["submission_id"]
            if not any(marker in text for marker in AGENT_BUSY):
                raise
            if time.monotonic() + poll_s > deadline:
                raise SubmitError(
                    f"{address} answered 'no available agent to submit job' for {wait_s:.0f} s: the"
                    " cluster's job agents are not up (a node still starting, or an overloaded head"
                    " node); check `ray status` and the dashboard, then submit again"
                ) from error
            if not busy:
                say(f"{address} has no job agent ready yet; trying again for up to {wait_s:.0f} s")
            busy = True
            time.sleep(poll_s)


def wait_for_final_status(client, job_id: str, address: str, wait_s: float = END_WAIT_S, poll_s: float = 0.5):
    """The job's status once it is SUCCEEDED, FAILED or STOPPED. Raises SubmitError, naming the job,
    when it is still in another state after ``wait_s`` seconds (called when its log stream ended)."""
    from ray.job_submission import JobStatus

    final = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    deadline = time.monotonic() + wait_s
    status = client.get_job_status(job_id)
    while status not in final:
        if time.monotonic() > deadline:
            raise SubmitError(
                f"job {job_id}: its log stream ended but its status is still {status}"
                f" after {wait_s:.0f} s; see `ray job status {job_id} --address {address}`"
            )
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    return status


def submit(request: dict, address: str, follow: bool) -> tuple[str, str | None]:
    """Submits; with ``follow`` streams the logs until the job ends. Returns (job id, final status).

    Raises SubmitError when the cluster has no job agent for AGENT_WAIT_S seconds, or when a job whose
    log stream ended reports no final state within END_WAIT_S seconds.
    """
    import asyncio

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = submit_with_retry(client, request, address)
    if not follow:
        return job_id, None

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = wait_for_final_status(client, job_id, address)
    return job_id, str(status.value if hasattr(status, "value") else status)
