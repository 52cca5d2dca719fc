"""Deciding what runs at each denoising iteration. Never touches a model.

Requests join and leave the running batch at every step: between steps the scheduler admits
waiting requests (up to `max_active`), then picks which active requests step now. Requests of
one UNet and latent size (a call key) share a UNet call; a cap bounds the UNet rows of one call.
With `step_batching` off it serves one request at a time, start to end (the baseline a
request-at-a-time server gives).

Fairness, and its bound. A turn counter orders events: each admission and each call takes the
next turn, and a job records the turn it was admitted or last stepped in (`last_turn`). Each
call is led by the active job with the smallest `last_turn` (ties: earliest arrival), so a job
just admitted queues behind every job already running. The leader's call key decides the call;
its peers of that key fill the remaining rows, skipping any that does not fit (a smaller one
behind it may). Bound, K = max_active: an active job steps at least once in every max_active
consecutive calls, from its admission on. Proof: let s be job J's `last_turn` and S the active
jobs whose `last_turn` is at most s (J among them, so |S| <= max_active). A call steps its
leader, a member of S, and gives it a turn above s; jobs admitted later get one above s too;
so S loses a member with every call and gains none, and J, in S, steps within |S| calls.
(tests/unit/test_scheduler.py checks it over random arrivals, keys and row counts.)
"""

from typing import TYPE_CHECKING, Any
from collections import deque
from dataclasses import dataclass

if TYPE_CHECKING:
    from collections.abc import Callable

    from serving.core.job import Job


@dataclass(frozen=True)
class BatchingConfig:
    max_rows: int = 32  # UNet rows per call (2 per request with guidance)
    max_active: int = 16  # requests holding latents at once
    max_queue: int = 64  # requests waiting for admission; more are refused
    step_batching: bool = True


class QueueFull(Exception):
    pass


class StepScheduler:
    def __init__(self, config: BatchingConfig):
        self.config = config
        self.waiting: deque[Job] = deque()
        self.turn = 0  # admissions and calls so far

    def enqueue(self, job: "Job") -> None:
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"admission queue is full ({self.config.max_queue} waiting)")
        self.waiting.append(job)

    def admit(self, active: list["Job"]) -> list["Job"]:
        """Waiting jobs that join the active set now, in arrival order."""
        limit = self.config.max_active if self.config.step_batching else 1
        admitted: list[Job] = []
        while self.waiting and len(active) + len(admitted) < limit:
            job = self.waiting.popleft()
            self.turn += 1
            job.last_turn = self.turn  # after every job already running: it waits its turn
            admitted.append(job)
        return admitted

    def pick(self, active: list["Job"]) -> list["Job"]:
        """The active jobs that take one denoising step in this iteration's UNet call."""
        self.turn += 1
        if not active:
            return []
        if not self.config.step_batching:
            chosen = [active[0]]
        else:
            # the longest-unserved job leads and decides the call key (UNet and latent size) of
            # this call; its peers fill the rows
            order = sorted(active, key=lambda j: (j.last_turn, j.arrival))
            key = order[0].call_key
            chosen, rows = [order[0]], order[0].rows
            for job in order[1:]:
                if job.call_key == key and rows + job.rows <= self.config.max_rows:
                    chosen.append(job)
                    rows += job.rows
        for job in chosen:
            job.last_turn = self.turn
        return chosen

    def remove_waiting(self, predicate: "Callable[[Job], Any]") -> list["Job"]:
        """Takes out waiting jobs matching `predicate` (cancelled, past deadline)."""
        removed = [j for j in self.waiting if predicate(j)]
        for job in removed:
            self.waiting.remove(job)
        return removed
