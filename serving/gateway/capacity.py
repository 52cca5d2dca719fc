"""Load shedding at the edge: the gateway admits no more images than the pipeline holds, so the
excess is refused here, before it costs Triton anything.

The pipeline holds `max_active` running and `max_queue` waiting jobs (one per image; its config
parameters, read whenever it becomes ready): those are the slots. This gateway counts its own
images in flight; the engine's load (its status message, every second) tells what else holds
slots (the operator's KServe clients). An image is admitted while they leave room for it.

A request that finds no room waits up to `wait_s` for one, behind those already waiting (a
sleeping coroutine: no CPU), then is refused UNAVAILABLE with Retry-After. Why wait rather than
refuse at once: a client that resends at once when refused (as naive clients do) turns every
fast refusal into another request, and such a storm of refusals took the CPU the UNet needs
(issue 22: 16 clients 7.0 img/s, 100 resending clients 3.5 img/s). Waiting paces them to one
refusal per `wait_s` each. Beyond `max_waiting` waiting requests, refusals are immediate.

Admission is two calls with no await between them in every front (`ImageService.admit` waits,
`ImageService.events` takes the slots at its start and frees them when it ends), so nothing is
reserved that a call which never starts would leak."""
import asyncio
import math

from serving.core.errors import UNAVAILABLE
from serving.gateway.errors import ApiError


class Capacity:
    def __init__(self, wait_s: float = 2.0, max_waiting: int = 1024):
        if not 0 <= wait_s < math.inf or max_waiting < 0:
            raise ValueError(f"admission wait must be a finite number of seconds >= 0 (got {wait_s}) and the "
                             f"waiting bound >= 0 (got {max_waiting})")
        self.wait_s = wait_s
        self.max_waiting = max_waiting
        self.slots: int | None = None  # unknown until the pipeline's config is read: the engine bounds alone
        self.in_flight = 0  # this gateway's images between `take` and `release`
        self.external = 0  # slots the engine reported held by others at its last status
        self.waiting = 0
        self._changed = asyncio.Event()

    def configure(self, running: int, queued: int) -> None:
        """The pipeline's slots: its running and queue bounds."""
        self.slots = max(1, running + queued)
        self._signal()

    def observe(self, engine_load: int) -> None:
        """The engine's active + queued jobs at its last status message."""
        self.external = max(0, engine_load - self.in_flight)
        self._signal()

    def room(self, n: int) -> bool:
        if self.slots is None:
            return True
        used = self.in_flight + self.external
        return used + n <= self.slots or used == 0  # a request larger than the pipeline runs alone

    async def wait_for_room(self, n: int) -> None:
        """Returns once `n` images fit, behind the requests already waiting; raises ApiError
        UNAVAILABLE (Retry-After) after `wait_s`, or at once past `max_waiting`."""
        if self.waiting == 0 and self.room(n):
            return
        if self.waiting >= self.max_waiting:
            raise self._refusal()
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                while not self.room(n):
                    await self._changed.wait()
        except TimeoutError:
            raise self._refusal() from None
        finally:
            self.waiting -= 1

    def take(self, n: int) -> None:
        self.in_flight += n

    def release(self, n: int) -> None:
        self.in_flight -= n
        self._signal()

    def _signal(self) -> None:
        """Wakes every waiter (each checks its own room, in the order they began waiting)."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _refusal(self) -> ApiError:
        return ApiError(UNAVAILABLE, f"the pipeline is full ({self.in_flight + self.external} of {self.slots} slots "
                        f"taken, {self.waiting} requests waiting); retry later", retry_after_s=max(1.0, self.wait_s))
