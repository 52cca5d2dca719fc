"""The gateway process: one asyncio loop serving the gRPC front (grpc.aio) and the REST front
(aiohttp), both in front of Triton's `pipeline` (serving/gateway/pipeline.py).

Readiness follows the pipeline: a watch asks Triton every second whether `pipeline` is ready
and whether its engine admits (a status message: a drained or stopped engine is not ready, which
Triton's own readiness does not say), reads its config (the inputs it declares) whenever it
becomes ready, and sets /readyz and the gRPC health status. Until then requests are answered
UNAVAILABLE.

Adding to it: a new gRPC service is one more `add_*_to_server` in `start`; a REST route or a
page is one more `app.router.add_*` on `build_app`'s application (the live generations and the
page are added by serving/gateway/rest_live.py).
"""

import asyncio
from dataclasses import dataclass, field
import logging
from typing import Any
import signal

from aiohttp import web
import grpc

from serving.gateway import browser
from serving.gateway.access import Access, ApiKeys, RateLimiter, is_loopback
from serving.gateway.browser import BrowserGuard
from serving.gateway.capacity import Capacity
from serving.gateway.grpc_api import add_services, set_serving
from serving.gateway.pipeline import PipelineClient
from serving.gateway.replicas import Replicas, default_name
from serving.gateway.rest_api import build_app
from serving.gateway.rest_live import add_routes
from serving.gateway.service import ImageService, Limits
from serving.gateway.telemetry import GatewayMetrics

log = logging.getLogger("ldm.gateway")


@dataclass
class GatewayConfig:
    triton: str = "127.0.0.1:8001"  # Triton's gRPC address
    host: str = "127.0.0.1"
    rest_port: int = 8080  # 0: any free port
    grpc_port: int = 50051
    keys: ApiKeys | None = None
    allow_anonymous: bool = False  # serve without keys on a non-loopback address
    rate: float = 0.0  # images per second per caller; 0: no limit
    burst: float = 16.0
    limits: Limits = field(default_factory=Limits)
    drain_s: float = 30.0  # on stop: running calls may finish for this long; new ones are refused
    watch_interval_s: float = 1.0
    replica_name: str = field(default_factory=default_name)  # prefix of this gateway's generation ids
    peers: dict = field(default_factory=dict)  # other replicas' REST URLs by name
    peer_domain: str | None = None  # or: other replicas at http://<name>.<peer_domain>:<rest port>
    allowed_hosts: tuple = ()  # Host names answered besides loopback's and --host's ("*": any); serving/gateway/browser.py
    allowed_origins: tuple = ()  # web pages (scheme://host[:port]) that may call the REST front besides its own
    control_secret: str | None = None  # the pipeline's (serving/triton/control.py): steers need it
    admission_wait_s: float = 2.0  # how long a request waits for room in the pipeline (serving/gateway/capacity.py)
    max_key_share: float = 0.5  # the share of the pipeline's slots one key (address without keys) may hold

    def check(self) -> None:
        Replicas(self.replica_name, self.peers, self.peer_domain)  # raises ValueError for a bad name
        Capacity(self.admission_wait_s, share=self.max_key_share)  # and for a bad admission wait or share
        if self.keys is None and not self.allow_anonymous and not is_loopback(self.host):
            raise ValueError(
                f"the gateway would listen on {self.host} without API keys: give --api-keys FILE (or "
                "LDM_API_KEY_HASHES), or --allow-anonymous to serve anyone who can reach it"
            )


class Gateway:
    def __init__(self, config: GatewayConfig):
        config.check()
        self.config = config
        limiter = RateLimiter(config.rate, config.burst) if config.rate > 0 else None
        self.replicas = Replicas(config.replica_name, config.peers, config.peer_domain, config.rest_port or 8080)
        self.service = ImageService(
            PipelineClient(config.triton, config.control_secret),
            Access(config.keys, limiter),
            GatewayMetrics(),
            config.limits,
            config.replica_name,
            Capacity(config.admission_wait_s, share=config.max_key_share),
        )
        self.grpc_server: Any = None
        self.runner: web.AppRunner | None = None
        self.rest_port: int | None = None
        self.grpc_port: int | None = None
        self._watch_task: asyncio.Task | None = None

    async def start(self) -> "Gateway":
        size = self.config.limits.max_body_bytes
        self.grpc_server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", -1)]
        )
        self.health = add_services(self.grpc_server, self.service)
        await set_serving(self.health, False)
        self.grpc_port = self.grpc_server.add_insecure_port(f"{self.config.host}:{self.config.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot listen for gRPC on {self.config.host}:{self.config.grpc_port}")
        await self.grpc_server.start()
        # handler_cancellation: a client that disconnects cancels its handler, and so its generation
        app = build_app(self.service)
        add_routes(app, self.replicas)
        config = self.config
        browser.install(
            app,
            BrowserGuard.of(
                config.host, config.keys is not None, config.allowed_hosts, config.allowed_origins, config.peer_domain
            ),
        )
        runner = self.runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=self.config.drain_s
        )
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.rest_port)
        await site.start()
        self.rest_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # started: a Server
        self._watch_task = asyncio.create_task(self._watch())
        return self

    async def _watch(self) -> None:
        pipeline = self.service.pipeline
        while True:
            try:
                status = await pipeline.status() if await pipeline.is_ready() else None
                ready = status is not None and status.accepting
                if ready and not self.service.ready:
                    ready = await pipeline.load_model()
                    if ready:
                        model = pipeline.require_model()
                        log.info("pipeline at %s is ready; it takes %s", pipeline.url, ", ".join(sorted(model.inputs)))
                        self.service.capacity.configure(
                            model.parameter("max_active", int, 16), model.parameter("max_queue", int, 64)
                        )
                if ready and status is not None:
                    self.service.capacity.observe(status.active + status.queued)
            except Exception:  # whatever broke, the watch goes on: not ready until Triton answers
                log.exception("asking %s whether the pipeline is ready failed", pipeline.url)
                ready = False
            if ready != self.service.ready:
                self.service.ready = ready
                await set_serving(self.health, ready)
                if not ready:
                    log.warning("pipeline at %s is not ready", pipeline.url)
            await asyncio.sleep(self.config.watch_interval_s)

    async def stop(self) -> None:
        """Refuses new calls at once, lets those in flight finish for drain_s, then closes."""
        if self._watch_task:
            self._watch_task.cancel()
        self.service.ready = False
        stopping = []
        if self.grpc_server:
            await set_serving(self.health, False)
            stopping.append(self.grpc_server.stop(self.config.drain_s))
        if self.runner:
            stopping.append(self.runner.cleanup())
        await asyncio.gather(*stopping)
        await self.service.pipeline.close()


async def serve(config: GatewayConfig, announce=print) -> None:
    """Runs the gateway until SIGTERM or SIGINT."""
    gateway = await Gateway(config).start()
    announce(
        f"gateway ready  REST http://{config.host}:{gateway.rest_port}  gRPC {config.host}:{gateway.grpc_port}  "
        f"(Triton {config.triton}; API keys {'on' if config.keys else 'off'}; replica {config.replica_name})"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await gateway.stop()
