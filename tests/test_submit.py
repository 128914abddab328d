import pytest
from ray.job_submission import JobStatus

from cdd_ray.submit import SubmitError, submit_with_retry, wait_for_final_status

BUSY = RuntimeError(
    "Request failed with status code 500: No available agent to submit job, please try again later.."
)
BUSY_PY310 = RuntimeError(
    "Request failed with status code 500: Traceback ...\nTimeoutError: Failed to get head node agent within"
    " 10 seconds. The last exception is None"
)
EXISTS = RuntimeError("Request failed with status code 500: Job with submission_id cdd-x already exists.")
ADDRESS = "http://head:8265"


class FakeClient:
    """Answers submit_job with the queued errors first, then with the submission id; get_job_status
    with the queued states, the last one for ever."""

    def __init__(self, errors=(), states=()):
        self.errors = list(errors)
        self.states = list(states)
        self.requests = []

    def submit_job(self, **request):
        self.requests.append(request)
        if self.errors:
            raise self.errors.pop(0)
        return request["submission_id"]

    def get_job_status(self, job_id):
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def submit(client, wait_s=5.0, said=None):
    say = (said if said is not None else []).append
    return submit_with_retry(client, {"submission_id": "cdd-x"}, ADDRESS, wait_s=wait_s, poll_s=0.01, say=say)


def test_a_busy_job_agent_is_tried_again_with_the_same_submission_id_and_said_once():
    client, said = FakeClient([BUSY, BUSY_PY310, BUSY]), []
    assert submit(client, said=said) == "cdd-x"
    assert [r["submission_id"] for r in client.requests] == ["cdd-x"] * 4
    assert len(said) == 1 and ADDRESS in said[0]


def test_a_job_the_busy_answer_had_started_is_taken_as_this_submission():
    client = FakeClient([BUSY, EXISTS])
    assert submit(client) == "cdd-x"
    # Without a busy answer first, "already exists" is a real clash of job ids: raised.
    with pytest.raises(RuntimeError, match="already exists"):
        submit(FakeClient([EXISTS]))


def test_a_job_agent_that_stays_busy_ends_the_wait_with_the_address_named():
    client = FakeClient([BUSY] * 1000)
    with pytest.raises(SubmitError, match=f"{ADDRESS}.*no available agent"):
        submit(client, wait_s=0.05)
    assert 2 <= len(client.requests) < 1000


def test_other_submission_errors_are_not_retried():
    client = FakeClient([RuntimeError("Request failed with status code 401: Unauthorized")])
    with pytest.raises(RuntimeError, match="401"):
        submit(client)
    assert len(client.requests) == 1


def test_the_final_status_is_awaited_and_a_job_that_never_ends_is_named():
    running = FakeClient(states=[JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.SUCCEEDED])
    assert wait_for_final_status(running, "cdd-x", ADDRESS, wait_s=5, poll_s=0.01) == JobStatus.SUCCEEDED
    stuck = FakeClient(states=[JobStatus.RUNNING])
    with pytest.raises(SubmitError, match="job cdd-x.*still RUNNING"):
        wait_for_final_status(stuck, "cdd-x", ADDRESS, wait_s=0.05, poll_s=0.01)
