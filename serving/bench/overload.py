"""`ldm bench --overload`: goodput under a retry storm, in one run (issue 22, part 4).

Against a default server (tritonserver and its gateway on loopback, the pipeline's default
slots), REST `POST /v1/images/generations` from asyncio clients in a closed loop: first
`--overload-clients` (16) well-behaved ones, then `--storm-clients` (100) that resend at once
whenever they are refused (a 503 or 429, whatever Retry-After says, as naive clients do). Each
phase runs `--overload-seconds` after a warm-up; goodput is the images answered 200 within the
phase over its length. Target: storm goodput >= 85% of the 16-client goodput.
"""

import asyncio
from dataclasses import dataclass, field
import json
from pathlib import Path
import time

import numpy as np

TARGET_RATIO = 0.85


@dataclass
class Phase:
    clients: int
    seconds: float
    images: int = 0
    refusals: int = 0  # 503/429 answers (each resent at once)
    errors: dict = field(default_factory=dict)  # other statuses -> count
    refusal_s: list = field(default_factory=list)  # how long each refusal took to come

    def summary(self) -> dict:
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "images": self.images,
            "goodput_images_per_s": self.images / self.seconds,
            "refusals": self.refusals,
            "refusals_per_s": self.refusals / self.seconds,
            "refusal_p50_s": float(np.percentile(self.refusal_s, 50)) if self.refusal_s else None,
            "errors": self.errors,
        }


async def _client(session, url: str, body: bytes, phase: Phase, counting: asyncio.Event, stop: asyncio.Event):
    """Sends generations until `stop`; refusals are resent at once."""
    import aiohttp

    while not stop.is_set():
        sent = time.perf_counter()
        try:
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as answer:
                payload = await answer.read()
                status = answer.status
        except aiohttp.ClientError as exc:
            status, payload = type(exc).__name__, b""
        if not counting.is_set() or stop.is_set():
            continue
        if status == 200:
            phase.images += len(json.loads(payload)["data"])
        elif status in (429, 503):
            phase.refusals += 1
            phase.refusal_s.append(time.perf_counter() - sent)
        else:
            phase.errors[str(status)] = phase.errors.get(str(status), 0) + 1


async def run_phase(rest_url: str, fields: dict, clients: int, seconds: float, warmup_s: float) -> Phase:
    """`clients` closed-loop clients for warmup_s + seconds; counts the last `seconds` only
    (what ends after them is not counted: the clients are cancelled then)."""
    import aiohttp

    phase, counting, stop = Phase(clients, seconds), asyncio.Event(), asyncio.Event()
    body = json.dumps(fields).encode()
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        tasks = [
            asyncio.create_task(_client(session, rest_url + "/v1/images/generations", body, phase, counting, stop))
            for _ in range(clients)
        ]
        await asyncio.sleep(warmup_s)
        counting.set()
        await asyncio.sleep(seconds)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return phase


def add_arguments(parser):
    parser.add_argument(
        "--overload",
        action="store_true",
        help="measure goodput under a retry storm instead: --overload-clients well-behaved clients, then "
        "--storm-clients that resend at once when refused, against one server (REST)",
    )
    parser.add_argument(
        "--overload-clients", type=int, default=16, help="--overload: the calm phase's clients (default: %(default)s)"
    )
    parser.add_argument(
        "--storm-clients", type=int, default=100, help="--overload: the storm's clients (default: %(default)s)"
    )
    parser.add_argument(
        "--overload-seconds",
        type=float,
        default=60.0,
        help="--overload: counted seconds per phase, after a warm-up of a quarter of it (default: %(default)s)",
    )


def run_overload(args, checkpoint: Path, out: Path) -> int:
    from families.checkpoint import CheckpointInfo
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.bench.bench import PROMPTS
    from serving.gateway.process import GatewayProcess
    from serving.triton.server import TritonServer

    size = args.size or CheckpointInfo.read(checkpoint).native_size
    fields = {"prompt": PROMPTS[0], "steps": args.steps, "guidance_scale": args.guidance, "size": f"{size}x{size}"}
    repo = out / "repo-overload"
    write_repository(checkpoint, repo, pipeline_parameters=pipeline_parameters(unet=args.unet), log=lambda *a: None)
    warmup_s = args.overload_seconds / 4
    print(
        f"bench --overload: {checkpoint}, {size}x{size}, {args.steps} steps; {args.overload_clients} clients, then "
        f"{args.storm_clients} that resend at once when refused; {args.overload_seconds:g} s each after "
        f"{warmup_s:g} s of warm-up",
        flush=True,
    )
    with (
        TritonServer(repo, log_file=out / "tritonserver-overload.log") as server,
        GatewayProcess(
            server.grpc_url, log_file=out / "gateway-overload.log", control_secret=server.control_secret
        ) as gateway,
    ):
        phases = [
            asyncio.run(run_phase(gateway.rest_url, fields, clients, args.overload_seconds, warmup_s))
            for clients in (args.overload_clients, args.storm_clients)
        ]
    calm, storm = (p.summary() for p in phases)
    ratio = storm["goodput_images_per_s"] / calm["goodput_images_per_s"] if calm["goodput_images_per_s"] else 0.0
    report = {
        "checkpoint": str(checkpoint),
        "size": size,
        "steps": args.steps,
        "date": time.strftime("%Y-%m-%d"),
        "calm": calm,
        "storm": storm,
        "ratio": ratio,
        "target": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO,
    }
    for name, p in (("calm", calm), ("storm", storm)):
        refusal = f" (p50 {p['refusal_p50_s']:.2f} s)" if p["refusal_p50_s"] is not None else ""
        print(
            f"{name:5s} {p['clients']:4d} clients: {p['goodput_images_per_s']:.2f} img/s ({p['images']} images), "
            f"{p['refusals_per_s']:.1f} refusals/s{refusal}, errors {p['errors']}",
            flush=True,
        )
    print(
        f"storm goodput / calm goodput = {ratio:.2f} (target >= {TARGET_RATIO}): {'met' if report['met'] else 'NOT met'}"
    )
    (out / "overload.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'overload.json'}")
    return 0 if report["met"] else 1
