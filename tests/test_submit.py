import pytest

from cdd_ray.submit import AGENT_BUSY, SubmitError, submit_with_retry

BUSY = RuntimeError(f"Request failed with status code 500: {AGENT_BUSY}, please try again later..")


class FakeClient:
    """Answers submit_job with the queued errors first, then with the submission id."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.requests = []

    def submit_job(self, **request):
        self.requests.append(request)
        if self.errors:
            raise self.errors.pop(0)
        return request["submission_id"]


def test_a_busy_job_agent_is_retried_with_the_same_submission_id():
    client = FakeClient([BUSY, BUSY])
    job_id = submit_with_retry(client, {"submission_id": "cdd-x"}, "http://head:8265", wait_s=5, poll_s=0.01)
    assert job_id == "cdd-x"
    assert [r["submission_id"] for r in client.requests] == ["cdd-x"] * 3


def test_a_job_agent_that_stays_busy_ends_the_wait_with_the_address_named():
    client = FakeClient([BUSY] * 1000)
    with pytest.raises(SubmitError, match="http://head:8265.*no available agent"):
        submit_with_retry(client, {"submission_id": "cdd-x"}, "http://head:8265", wait_s=0.05, poll_s=0.01)
    assert 2 <= len(client.requests) < 1000


def test_other_submission_errors_are_not_retried():
    client = FakeClient([RuntimeError("Request failed with status code 401: Unauthorized")])
    with pytest.raises(RuntimeError, match="401"):
        submit_with_retry(client, {"submission_id": "cdd-x"}, "http://head:8265", wait_s=5, poll_s=0.01)
    assert len(client.requests) == 1
