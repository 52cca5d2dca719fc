"""Deciding what runs at each denoising iteration. Never touches a model.

Requests join and leave the running batch at every step: between steps the scheduler admits
waiting requests (up to `max_active`), then picks which active requests step now. Requests of
one UNet and latent size (a call key) share a UNet call; call keys take turns by who waited
longest; a cap bounds the UNet rows of one call. With `step_batching` off it serves one request at a time, start to end
(the baseline a request-at-a-time server gives).
"""
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    max_rows: int = 32  # UNet rows per call (2 per request with guidance)
    max_active: int = 16  # requests holding latents at once
    max_queue: int = 64  # requests waiting for admission; more are refused
    step_batching: bool = True


class QueueFull(Exception):
    pass


class StepScheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting = deque()
        self.iteration = 0

    def enqueue(self, job) -> None:
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"admission queue is full ({self.config.max_queue} waiting)")
        self.waiting.append(job)

    def admit(self, active: list) -> list:
        """Waiting jobs that join the active set now, in arrival order."""
        limit = self.config.max_active if self.config.step_batching else 1
        admitted = []
        while self.waiting and len(active) + len(admitted) < limit:
            admitted.append(self.waiting.popleft())
        return admitted

    def pick(self, active: list) -> list:
        """The active jobs that take one denoising step in this iteration's UNet call."""
        self.iteration += 1
        if not active:
            return []
        if not self.config.step_batching:
            chosen = [active[0]]
        else:
            # the longest-unserved job decides the call key (UNet and latent size) of this call;
            # its peers fill the rows
            order = sorted(active, key=lambda j: (j.last_stepped, j.arrival))
            key = order[0].call_key
            chosen, rows = [], 0
            for job in order:
                if job.call_key != key:
                    continue
                if chosen and rows + job.rows > self.config.max_rows:
                    break
                chosen.append(job)
                rows += job.rows
        for job in chosen:
            job.last_stepped = self.iteration
        return chosen

    def remove_waiting(self, predicate) -> list:
        """Takes out waiting jobs matching `predicate` (cancelled, past deadline)."""
        removed = [j for j in self.waiting if predicate(j)]
        for job in removed:
            self.waiting.remove(job)
        return removed
