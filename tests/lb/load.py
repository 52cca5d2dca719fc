"""Load through the load balancer, with an optional replica crash in the middle.

Bounded by construction: a fixed number of requests, a fixed number of worker threads, and a
deadline for the whole run. Every request goes through serving.client.retry.call_with_retry, and
what happened to it (attempts, errors, times) is recorded for the report and the test.
"""

import itertools
import threading
import time
from dataclasses import dataclass, field

from serving.client.retry import RetryPolicy, RetryStats, call_with_retry


@dataclass
class RequestRecord:
    index: int
    started: float  # time.time() of the first attempt
    ended: float = 0.0
    ok: bool = False
    attempts: int = 0
    errors: dict = field(default_factory=dict)  # status -> failed attempts
    final_error: str | None = None
    messages: list = field(default_factory=list)  # error text of each failed attempt


class LoadRun:
    """`concurrency` threads send up to `n_requests` generations (seeds 0, 1, ...) through the
    client; stop_after() ends the run early after a given number of further requests."""

    def __init__(
        self,
        make_client,
        n_requests: int,
        concurrency: int,
        gen_kwargs: dict,
        policy: RetryPolicy = RetryPolicy(),
        prompt: str = "a red circle",
    ):
        self.make_client = make_client
        self.n_requests = n_requests
        self.concurrency = concurrency
        self.gen_kwargs = gen_kwargs
        self.policy = policy
        self.prompt = prompt
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._cap = n_requests
        self._next = itertools.count()
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrency)]

    def start(self) -> "LoadRun":
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout_s: float) -> bool:
        """True if every worker finished within the deadline."""
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def stop_after(self, more: int) -> int:
        """Let only `more` further requests start (the run then ends); returns the new total."""
        with self._lock:
            self._cap = min(self._cap, len(self.records) + more)
            return self._cap

    def completed(self) -> int:
        with self._lock:
            return sum(r.ok for r in self.records)

    def _worker(self) -> None:
        client = self.make_client()
        try:
            while True:
                with self._lock:
                    index = next(self._next)
                    if index >= self._cap:
                        return
                    record = RequestRecord(index=index, started=time.time())
                    self.records.append(record)
                stats = RetryStats()

                def attempt(index=index, record=record):
                    try:
                        return client.generate(self.prompt, seed=index, **self.gen_kwargs)
                    except Exception as error:
                        record.messages.append(f"{time.time():.3f} {error}")
                        raise

                try:
                    call_with_retry(attempt, self.policy, stats)
                    record.ok = True
                except Exception as error:  # recorded, judged by the caller
                    record.final_error = f"{type(error).__name__}: {error}"
                record.ended = time.time()
                record.attempts = stats.attempts
                record.errors = dict(stats.errors)
        finally:
            close = getattr(client, "close", None)
            if close:
                close()


def summarize(records: list[RequestRecord]) -> dict:
    """sent / completed / failed / retried, as the report prints them."""
    failed_attempts = {}
    for r in records:
        for status, n in r.errors.items():
            failed_attempts[status] = failed_attempts.get(status, 0) + n
    return {
        "sent": len(records),
        "attempts": sum(r.attempts for r in records),
        "completed": sum(r.ok for r in records),
        "failed_attempts": sum(failed_attempts.values()),
        "failed_by_status": failed_attempts,
        "retried": sum(r.attempts > 1 for r in records),
        "recovered_by_retry": sum(r.ok and r.attempts > 1 for r in records),
        "failed_finally": sum(not r.ok for r in records),
    }
