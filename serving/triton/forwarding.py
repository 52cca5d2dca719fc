"""How the request/response front `pipeline_unary` hands requests to the decoupled `pipeline`,
as plain Python (no Triton import; the model templates inject Triton's calls).

Triton 2.51's python backend runs a non-decoupled model's `execute` to completion before the
instance takes its next batch (an `async def execute` is awaited there too: only decoupled models
run it in the background). Since 24.06 a non-decoupled model may instead answer through the
request's response sender, after `execute` returned, with exactly one response. So the front's
`execute` only starts one forwarding thread per request and returns: every HTTP and unary gRPC
request reaches the engine's bounded admission queue at once (full: UNAVAILABLE at once), and
they all join the step-level batch.

Cancellation: a BLS request of this python backend cannot be cancelled (its response
iterator's `cancel()` came in 2025), so the front sends the pipeline a cancel message naming
the request's id (`CANCEL_PARAMETER`), and the pipeline's sink for that id reports itself
cancelled; the engine then drops the job at its next step. Triton's gRPC endpoint marks a
request cancelled when its client cancels; its HTTP endpoint (2.51) does not notice a client
that disconnects, so a Triton-HTTP caller that leaves is bounded by its `timeout_s` only (the
gateway, serving/gateway/, cancels on disconnect).
"""

from collections import OrderedDict
import threading
from collections.abc import Callable

# request parameter of a cancel message to `pipeline`: the id of the request to cancel
CANCEL_PARAMETER = "cancel_request_id"


class Forwards:
    """The front's requests in flight, at most `limit` (each holds a thread), and their
    cancellation: `sweep` asks each whether its client cancelled and, once, calls its cancel.

    A forward must be removed before its response is sent, and `sweep` asks only registered
    forwards, holding the lock while it asks: so no sender is asked after its final response.
    (Asking a sender whose response factory Triton has freed crashes tritonserver 2.51: the
    python backend calls TRITONBACKEND_ResponseFactoryIsCancelled on the freed factory.)"""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"pipeline_unary parameter max_in_flight must be at least 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self._entries = {}  # key -> (client_cancelled, cancel)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def add(self, key, client_cancelled: Callable[[], bool], cancel: Callable[[], None]) -> bool:
        """Registers a forward; False (not registered) when `limit` are already in flight."""
        with self._lock:
            if len(self._entries) >= self.limit:
                return False
            self._entries[key] = (client_cancelled, cancel)
            return True

    def remove(self, key) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def sweep(self, log=print) -> int:
        """Cancels the forwards whose client cancelled; returns how many. A forward whose check
        or cancel raises is logged and skipped: the others are still swept."""
        to_cancel = []
        with self._lock:  # held while asking: `remove` (and so the final send) waits for it
            for key, (client_cancelled, cancel) in list(self._entries.items()):
                try:
                    if client_cancelled():
                        del self._entries[key]
                        to_cancel.append((key, cancel))
                except Exception as exc:
                    log(f"pipeline_unary: asking whether forward {key} was cancelled failed: {exc!r}")
        for key, cancel in to_cancel:
            try:
                cancel()
            except Exception as exc:
                log(f"pipeline_unary: cancelling forward {key} failed: {exc!r}")
        return len(to_cancel)

    def sweep_until(self, stopping: threading.Event, interval_s: float, log=print) -> None:
        """The sweeper thread's loop: sweeps every `interval_s` until `stopping`; whatever one
        sweep raises is logged, and the next sweep comes (disconnect cancellation must not end)."""
        while not stopping.wait(interval_s):
            try:
                self.sweep(log)
            except Exception as exc:
                log(f"pipeline_unary: a cancellation sweep failed: {exc!r}")


class CancelRegistry:
    """Cancel flags of the pipeline's requests by request id. A cancel that arrives before its
    request (the two travel separately) is remembered, for the last `remember` such ids."""

    def __init__(self, remember: int = 1024):
        self._lock = threading.Lock()
        self._flags = {}
        self._early = OrderedDict()
        self._remember = remember

    def register(self, request_id: str) -> threading.Event:
        """The request's cancel flag. An id already in flight keeps its flag: the newcomer gets
        one nothing sets (the engine refuses it as a duplicate id)."""
        flag = threading.Event()
        with self._lock:
            if request_id in self._flags:
                return flag
            if self._early.pop(request_id, None) is not None:
                flag.set()
            self._flags[request_id] = flag
        return flag

    def forget(self, request_id: str, flag: threading.Event) -> None:
        """Forgets the request whose flag `register` gave (not another holder of its id)."""
        with self._lock:
            if self._flags.get(request_id) is flag:
                del self._flags[request_id]

    def cancel(self, request_id: str) -> bool:
        """True when a request with this id was in flight."""
        with self._lock:
            flag = self._flags.get(request_id)
            if flag is None:
                self._early[request_id] = True
                while len(self._early) > self._remember:
                    self._early.popitem(last=False)
                return False
        flag.set()
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._flags)
