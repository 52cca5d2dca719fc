"""The client retry policy (serving/client/retry.py): which errors are replayed, how often, and
what is counted. The real-failure path (a replica killed under load) is exercised in
tests/deploy/test_deploy_loadbalance.py; here a callable raises tritonclient's own exception."""

import random

import pytest
from tritonclient.utils import InferenceServerException

from serving.client.retry import RetryPolicy, RetryStats, call_with_retry


def _failing(statuses, result="image", msg="boom"):
    """A call that raises InferenceServerException with each status in turn, then returns."""
    remaining = list(statuses)

    def call():
        if remaining:
            raise InferenceServerException(msg=msg, status=remaining.pop(0))
        return result

    return call


def test_unavailable_is_retried_until_success():
    stats, sleeps = RetryStats(), []
    # gRPC transport form, the pipeline's coded form, and a proxy's HTTP status.
    out = call_with_retry(
        _failing(["StatusCode.UNAVAILABLE", "UNAVAILABLE", "502"]), RetryPolicy(), stats, sleeps.append
    )
    assert out == "image"
    assert stats.as_dict() == {
        "calls": 1,
        "attempts": 4,
        "retried": 1,
        "recovered": 1,
        "gave_up": 0,
        "errors": {"UNAVAILABLE": 2, "502": 1},
    }
    assert len(sleeps) == 3


@pytest.mark.parametrize(
    "status",
    [
        "StatusCode.DEADLINE_EXCEEDED",
        "DEADLINE_EXCEEDED",
        "StatusCode.CANCELLED",
        "INVALID_ARG",
        "StatusCode.INTERNAL",
        None,
    ],
)
def test_other_errors_are_not_retried(status):
    stats = RetryStats()
    with pytest.raises(InferenceServerException):
        call_with_retry(_failing([status]), RetryPolicy(), stats, lambda s: None)
    assert (stats.attempts, stats.retried, stats.gave_up) == (1, 0, 1)


def test_gives_up_after_max_attempts():
    stats = RetryStats()
    with pytest.raises(InferenceServerException):
        call_with_retry(_failing(["StatusCode.UNAVAILABLE"] * 10), RetryPolicy(max_attempts=3), stats, lambda s: None)
    assert (stats.attempts, stats.retried, stats.recovered, stats.gave_up) == (3, 1, 0, 1)


def test_backoff_is_jittered_exponential_and_capped():
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=0.3)
    rng = random.Random(0)
    for n, ceiling in [(1, 0.1), (2, 0.2), (3, 0.3), (6, 0.3)]:
        draws = [policy.backoff_s(n, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.8 * ceiling  # full jitter spans the whole range


def test_at_least_one_attempt_required():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
