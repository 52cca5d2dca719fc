"""Load shedding at the edge: the gateway admits no more images than the pipeline holds, so the
excess is refused here, before it costs Triton anything.

The pipeline holds `max_active` running and `max_queue` waiting jobs (one per image; its config
parameters, read whenever it becomes ready): those are the slots. This gateway counts its own
images in flight; the engine's load (its status message, every second) tells what else holds
slots (the operator's KServe clients). An image is admitted while they leave room for it.

One caller (a key; its address without keys) may hold at most `share` of the slots, so one key
cannot take the queue: another key's request finds room as soon as the pipeline has some
(tests/gateway/test_gateway_capacity.py checks it as a property over two keys).

A request that finds no room waits up to `wait_s` for one, behind the waiting requests that
could use it (a sleeping coroutine: no CPU), then is refused UNAVAILABLE with Retry-After. Why wait rather than
refuse at once: a client that resends at once when refused (as naive clients do) turns every
fast refusal into another request, and such a storm of refusals took the CPU the UNet needs
(issue 22: 16 clients 7.0 img/s, 100 resending clients 3.5 img/s). Waiting paces them to one
refusal per `wait_s` each. Beyond `max_waiting` waiting requests, refusals are immediate.

Admission is two calls (`ImageService.admit` waits, `ImageService.events` takes the slots at its
start and frees them when it ends), so nothing is reserved that a call which never starts would
leak. The REST and unary gRPC fronts make them with no await between; a Session's generation
starts in a task of its own, so a few may pass the check together, and the engine's own queue
bound refuses any excess (UNAVAILABLE)."""

import asyncio
from collections import Counter
from dataclasses import dataclass
import math

from serving.core.errors import UNAVAILABLE
from serving.gateway.errors import ApiError


@dataclass(eq=False)
class _Waiter:
    n: int
    caller: str
    woken: asyncio.Event


class Capacity:
    def __init__(self, wait_s: float = 2.0, max_waiting: int = 1024, share: float = 0.5):
        if not 0 <= wait_s < math.inf or max_waiting < 0 or not 0 < share <= 1:
            raise ValueError(
                f"admission wait must be a finite number of seconds >= 0 (got {wait_s}), the waiting "
                f"bound >= 0 (got {max_waiting}) and a key's share in (0, 1] (got {share})"
            )
        self.wait_s = wait_s
        self.max_waiting = max_waiting
        self.share = share
        self.slots: int | None = None  # unknown until the pipeline's config is read: the engine bounds alone
        self.in_flight = 0  # this gateway's images between `take` and `release`
        self.by_caller = Counter()  # the same, per caller
        self.external = 0  # slots the engine reported held by others at its last status
        self._waiters: list = []  # _Waiter, oldest first

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def caller_cap(self) -> int | None:
        """The most images one caller may hold (None: no slots known yet)."""
        return None if self.slots is None else max(1, math.floor(self.slots * self.share))

    def configure(self, running: int, queued: int) -> None:
        """The pipeline's slots: its running and queue bounds."""
        self.slots = max(1, running + queued)
        self._signal()

    def observe(self, engine_load: int) -> None:
        """The engine's active + queued jobs at its last status message."""
        self.external = max(0, engine_load - self.in_flight)
        self._signal()

    def room(self, n: int, caller: str = "") -> bool:
        """Whether `n` more images of `caller` fit now (a request larger than the pipeline, or
        than a caller's share, runs alone)."""
        if self.slots is None:
            return True
        used, mine = self.in_flight + self.external, self.by_caller[caller]
        cap = self.caller_cap()
        assert cap is not None  # slots are known
        return (used + n <= self.slots or used == 0) and (mine + n <= cap or mine == 0)

    def _first_admissible(self):
        """The oldest waiter that fits now, or None."""
        return next((w for w in self._waiters if self.room(w.n, w.caller)), None)

    async def wait_for_room(self, n: int, caller: str = "") -> None:
        """Returns once `n` images of `caller` fit and no older waiter fits first; raises
        ApiError UNAVAILABLE (Retry-After) after `wait_s`, or at once past `max_waiting`."""
        if self.room(n, caller) and self._first_admissible() is None:
            return
        if self.waiting >= self.max_waiting:
            raise self._refusal()
        waiter = _Waiter(n, caller, asyncio.Event())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.wait_s):
                while self._first_admissible() is not waiter:
                    waiter.woken.clear()
                    await waiter.woken.wait()
        except TimeoutError:
            raise self._refusal() from None
        finally:
            self._waiters.remove(waiter)
            self._signal()  # the next may go (it checks again once this one has taken its slots)

    def take(self, n: int, caller: str = "") -> None:
        self.in_flight += n
        self.by_caller[caller] += n

    def release(self, n: int, caller: str = "") -> None:
        self.in_flight -= n
        self.by_caller[caller] -= n
        if self.by_caller[caller] <= 0:
            del self.by_caller[caller]
        self._signal()

    def _signal(self) -> None:
        """Wakes the oldest waiter that fits (one scan: a full pipeline wakes nobody)."""
        waiter = self._first_admissible()
        if waiter is not None:
            waiter.woken.set()

    def _refusal(self) -> ApiError:
        return ApiError(
            UNAVAILABLE,
            f"the pipeline is full ({self.in_flight + self.external} of {self.slots} slots "
            f"taken, {self.waiting} requests waiting); retry later",
            retry_after_s=max(1.0, self.wait_s),
        )
