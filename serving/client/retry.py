"""Client-side retry policy for generation requests.

Why retrying is safe: a generation request is idempotent. Its image is a pure function of
(prompt, negative_prompt, seed, steps, guidance_scale, size, eta) — noise comes from the
request's own seed, never from its batch-mates — and it changes no server state. Replaying it
on another replica returns the same image; the only cost is the compute repeated.

What is retried (the error's status(): tritonclient's InferenceServerException, or the gateway
client's ImagesError; compared without tritonclient's "StatusCode." prefix, so the pipeline's
own coded errors and transport errors match alike):
  * UNAVAILABLE — the replica or the connection to it went away (process
    killed, pod drained, connection reset, a stream that broke before the request was sent:
    serving.client reports that as UNAVAILABLE), the proxy found no live upstream (nginx / an
    Ingress answers 502/503/504, which gRPC clients see as UNAVAILABLE), or Triton refused
    the request (server not ready, the pipeline's queue full: `--max-queue`).
  * HTTP 502, 503, 504 — the same conditions over Triton's HTTP protocol.
What is not:
  * DEADLINE_EXCEEDED — the request may still be computing; a replay would double the load
    exactly when the fleet is slow.
  * CANCELLED — the caller asked for it.
  * Errors the model returned (bad input, limits exceeded; status None) and every other
    code — replaying them gives the same error.

Backoff: exponential with full jitter, attempt n (n >= 1 retries) sleeps a uniform random
time in [0, min(max_backoff_s, initial_backoff_s * multiplier**(n-1))], so clients that lost
the same replica do not come back in lockstep. At most `max_attempts` calls in all (default
4: the first call and 3 retries). A load balancer that has marked the failed replica down
sends the replay elsewhere; with client-side balancing the gRPC channel does.
"""

import random
import threading
import time
from dataclasses import dataclass, field
from typing import TypeVar
from collections.abc import Callable


T = TypeVar("T")

RETRYABLE_STATUSES = frozenset({"UNAVAILABLE", "502", "503", "504"})


def status_code(error: BaseException) -> str:
    """ "UNAVAILABLE" for "StatusCode.UNAVAILABLE" (gRPC transport) and "UNAVAILABLE" (the
    pipeline's coded errors); the exception's class name for errors without a status."""
    status = getattr(error, "status", None)
    if callable(status):
        return str(status()).removeprefix("StatusCode.")
    return type(error).__name__


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    multiplier: float = 2.0
    max_backoff_s: float = 2.0
    retryable_statuses: frozenset = RETRYABLE_STATUSES

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def is_retryable(self, error: BaseException) -> bool:
        return status_code(error) in self.retryable_statuses

    def backoff_s(self, retry_number: int, rng: random.Random) -> float:
        """Sleep before retry number `retry_number` (1 = first retry)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry_number - 1))
        return rng.uniform(0.0, ceiling)


@dataclass
class RetryStats:
    """Counts over all calls through one RetryingClient (thread-safe)."""

    calls: int = 0  # generate() calls made by the user
    attempts: int = 0  # requests actually sent (calls + retries)
    retried: int = 0  # calls that needed at least one retry
    recovered: int = 0  # retried calls that finally succeeded
    gave_up: int = 0  # calls that failed after retries or with a non-retryable error
    errors: dict = field(default_factory=dict)  # status -> count of failed attempts
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "calls": self.calls,
                "attempts": self.attempts,
                "retried": self.retried,
                "recovered": self.recovered,
                "gave_up": self.gave_up,
                "errors": dict(self.errors),
            }


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy = RetryPolicy(),
    stats: RetryStats | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call fn() until it succeeds, fails with a non-retryable error, or attempts run out."""
    stats = stats if stats is not None else RetryStats()
    rng = rng or random.Random()
    with stats._lock:
        stats.calls += 1
    attempt = 0
    while True:
        attempt += 1
        with stats._lock:
            stats.attempts += 1
            if attempt == 2:
                stats.retried += 1
        try:
            result = fn()
        except Exception as error:
            status = status_code(error)
            with stats._lock:
                stats.errors[status] = stats.errors.get(status, 0) + 1
            if attempt >= policy.max_attempts or not policy.is_retryable(error):
                with stats._lock:
                    stats.gave_up += 1
                raise
            sleep(policy.backoff_s(attempt, rng))
            continue
        if attempt > 1:
            with stats._lock:
                stats.recovered += 1
        return result


class RetryingClient:
    """Wraps a client with `generate(...)` (serving.client.LdmClient) in the retry policy.

    Only for requests that are idempotent, which generation is (see module docstring).
    """

    def __init__(self, client, policy: RetryPolicy = RetryPolicy(), stats: RetryStats | None = None):
        self.client = client
        self.policy = policy
        self.stats = stats if stats is not None else RetryStats()

    def generate(self, prompt: str, **kwargs):
        return call_with_retry(lambda: self.client.generate(prompt, **kwargs), self.policy, self.stats)

    def __getattr__(self, name):
        return getattr(self.client, name)
