"""The gateway's metrics (prometheus-client, served at /metrics on its REST port) and request ids.

Every request gets an id: the client's `X-Request-Id` (REST header or gRPC metadata) when it
is a short token, else a new one. It is returned in the response header / initial metadata,
printed in every log line the gateway writes while handling it (a contextvar read by a logging
filter), and begins each image's Triton request id (`triton_prefix`), which adds 64 random bits:
clients choose their ids, and two requests must never share a Triton id (the pipeline finds a
generation by it, and refuses an id already running).
"""

import asyncio
from contextlib import contextmanager
import contextvars
import logging
import re
import secrets
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.core.errors import CANCELLED, INTERNAL
from serving.gateway.errors import ApiError

REQUEST_ID_HEADER = "x-request-id"
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_current = contextvars.ContextVar("request_id", default="-")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)

log = logging.getLogger("ldm.gateway")


def request_id(offered: str | None = None) -> str:
    return offered if offered and _ID.match(offered) else uuid.uuid4().hex


def unexpected(exc: BaseException, rid: str) -> ApiError:
    """What a request answers for an error nobody coded (logged with its traceback): INTERNAL
    naming the request id, never a bare 500 or a silent end."""
    log.error("unexpected error in request %s", rid, exc_info=exc)
    return ApiError(INTERNAL, f"the gateway failed on this request ({type(exc).__name__}); request id {rid}")


def triton_prefix(rid: str) -> str:
    """The prefix of a request's Triton request ids: its id, then 64 random bits."""
    return f"{rid}.{secrets.token_hex(8)}"


class RequestIdFilter(logging.Filter):
    def filter(self, record):
        record.request_id = _current.get()
        return True


def configure_logging(level=logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    root = logging.getLogger("ldm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class Outcome:
    """What a handler reports about its request: the code it ended with, images, timings."""

    def __init__(self):
        self.code = "OK"
        self.images = 0

    def failed(self, error: ApiError) -> ApiError:
        self.code = error.code
        return error


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ldm_gateway_requests", "requests by route and outcome code", ["route", "code"], registry=r
        )
        self.images = Counter("ldm_gateway_images", "images returned", ["route"], registry=r)
        self.in_flight = Gauge("ldm_gateway_in_flight_requests", "requests being handled", ["route"], registry=r)
        self.total = Histogram(
            "ldm_gateway_request_seconds",
            "time from receiving a request to its last image or error",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "ldm_gateway_queue_wait_seconds",
            "streams with progress: time until an image's first denoising step was done "
            "(waiting for admission, text encoding, one step)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_preview = Histogram(
            "ldm_gateway_first_preview_seconds",
            "streams with previews: time to the first preview",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    @contextmanager
    def request(self, route: str, rid: str):
        """Counts one request (in flight while inside), logs its end, and binds its id to the logs."""
        token = _current.set(rid)
        outcome = Outcome()
        start = time.monotonic()
        self.in_flight.labels(route).inc()
        try:
            yield outcome
        except ApiError as error:
            outcome.code = error.code
            raise
        except BaseException as error:
            if outcome.code == "OK":
                outcome.code = CANCELLED if isinstance(error, (asyncio.CancelledError, GeneratorExit)) else INTERNAL
            raise
        finally:
            elapsed = time.monotonic() - start
            self.in_flight.labels(route).dec()
            self.requests.labels(route, outcome.code).inc()
            self.total.labels(route).observe(elapsed)
            if outcome.images:
                self.images.labels(route).inc(outcome.images)
            log.info("%s %s in %.3f s (%d images)", route, outcome.code, elapsed, outcome.images)
            try:
                _current.reset(token)
            except ValueError:  # an async generator closed from another context
                pass
