"""The ways a client reaches the engine, for `ldm bench --via` and `ldm bench --compare-paths`:

  triton-grpc   Triton's KServe gRPC stream to `pipeline` (serving/client/kserve.py)
  triton-http   Triton's KServe HTTP to the unary front `pipeline_unary`
  gateway       the gateway's typed gRPC API (serving/client/images.py)
  gateway-rest  the gateway's OpenAI-style REST endpoint

The comparison runs them against one server in one run, interleaved so that the machine's
drift falls on all alike: single requests alternate between the paths, and the closed loops at
concurrency C run in the order A B C D D C B A, `rounds` times; it prints each path's ratio to
triton-grpc (of the median single-request latency, and of the mean throughput over its loops).
On a machine shared with other work wall-clock ratios are noisy, so it also reports the CPU
time the server (tritonserver and its stubs) and the gateway process spent per image in each
path's loops: the gateway's share of the work, whatever else the machine is doing.
"""

from contextlib import contextmanager
import http.client
import json
import time

import numpy as np
import psutil

from serving.bench.loadgen import closed_loop

PATHS = ("triton-grpc", "triton-http", "gateway", "gateway-rest")
BASELINE = "triton-grpc"


class GatewayGrpc:
    def __init__(self, url):
        from serving.client.images import ImagesClient

        self.client = ImagesClient(url)

    def generate(self, prompt, seed, **fields):
        return self.client.generate(prompt, seed=seed, **fields)[0]


class RestError(Exception):
    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.http_status = status

    def status(self) -> str:
        return str(self.http_status)


class GatewayRest:
    """POST /v1/images/generations on one kept-alive connection."""

    def __init__(self, base_url):
        host, port = base_url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=600)

    def generate(self, prompt, seed, height=None, width=None, **fields):
        body = {"prompt": prompt, "seed": seed, **fields}
        if height or width:
            body["size"] = f"{width}x{height}"
        self.connection.request(
            "POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = self.connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RestError(response.status, data)
        return json.loads(data)["data"][0]["b64_json"]


def client_factory(path: str, server, gateway=None):
    from serving.client.kserve import LdmClient

    factories = {
        "triton-grpc": lambda: LdmClient(server.grpc_url),
        "triton-http": lambda: LdmClient(server.http_url, "http"),
        "gateway": lambda: GatewayGrpc(gateway.grpc_url),
        "gateway-rest": lambda: GatewayRest(gateway.rest_url),
    }
    if path not in factories:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return factories[path]


@contextmanager
def serving(repo, path: str, log_dir, name: str):
    """A tritonserver on `repo`, with a gateway in front when `path` goes through one; yields
    (make_client, server)."""
    from serving.gateway.process import GatewayProcess
    from serving.triton.server import TritonServer

    with TritonServer(repo, log_file=log_dir / f"tritonserver-{name}.log") as server:
        if not path.startswith("gateway"):
            yield client_factory(path, server), server
            return
        with GatewayProcess(
            server.grpc_url, log_file=log_dir / f"gateway-{name}.log", control_secret=server.control_secret
        ) as gateway:
            yield client_factory(path, server, gateway), server


def compare_paths(
    repo,
    fields: dict,
    log_dir,
    paths=PATHS,
    concurrency: int = 16,
    requests: int = 48,
    single_requests: int = 16,
    rounds: int = 2,
    log=print,
) -> dict:
    """Single-request latency and closed-loop throughput of each path, with ratios to triton-grpc."""
    from serving.gateway.process import GatewayProcess
    from serving.triton.server import TritonServer

    paths = list(paths)
    with (
        TritonServer(repo, log_file=log_dir / "tritonserver-paths.log") as server,
        GatewayProcess(
            server.grpc_url, log_file=log_dir / "gateway-paths.log", control_secret=server.control_secret
        ) as gateway,
    ):
        factories = {p: client_factory(p, server, gateway) for p in paths}
        for p in paths:
            closed_loop(factories[p], fields, 2, 4)  # warm-up: connections, first calls
        clients = {p: factories[p]() for p in paths}
        latencies = {p: [] for p in paths}
        for i in range(single_requests):
            for p in paths if i % 2 == 0 else reversed(paths):
                start = time.perf_counter()
                clients[p].generate(seed=i, **fields)
                latencies[p].append(time.perf_counter() - start)
        loops = {p: [] for p in paths}
        cpu = {p: {"server": 0.0, "gateway": 0.0, "images": 0} for p in paths}
        for k, p in enumerate((paths + paths[::-1]) * rounds):
            before = cpu_seconds(server.process.pid), cpu_seconds(gateway.process.pid)
            loops[p].append(closed_loop(factories[p], fields, concurrency, requests, seed0=1000 * k).summary())
            after = cpu_seconds(server.process.pid), cpu_seconds(gateway.process.pid)
            cpu[p]["server"] += after[0] - before[0]
            cpu[p]["gateway"] += after[1] - before[1]
            cpu[p]["images"] += loops[p][-1]["completed"]
            log(f"  {p} closed C={concurrency}: {loops[p][-1]['throughput_images_per_s']:.2f} img/s")
    rows = []
    for p in paths:
        rows.append(
            {
                "path": p,
                "latency_p50_s": float(np.median(latencies[p])),
                "latency_mean_s": float(np.mean(latencies[p])),
                "throughput_images_per_s": float(np.mean([r["throughput_images_per_s"] for r in loops[p]])),
                "errors": {k: v for r in loops[p] for k, v in r["errors"].items()},
                "server_cpu_s_per_image": cpu[p]["server"] / max(1, cpu[p]["images"]),
                "gateway_cpu_s_per_image": cpu[p]["gateway"] / max(1, cpu[p]["images"]),
                "runs": loops[p],
            }
        )
    base = next(r for r in rows if r["path"] == BASELINE)
    for r in rows:
        r["latency_ratio"] = r["latency_p50_s"] / base["latency_p50_s"]
        r["throughput_ratio"] = r["throughput_images_per_s"] / base["throughput_images_per_s"]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "single_requests": single_requests,
        "rounds": rounds,
        "paths": rows,
        "targets": path_targets(rows, concurrency),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (those alive now)."""
    root = psutil.Process(pid)
    total = 0.0
    for p in [root] + root.children(recursive=True):
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def path_targets(rows: list, concurrency: int) -> list:
    by_path = {r["path"]: r for r in rows}
    targets = []
    if "gateway" in by_path:
        g = by_path["gateway"]
        targets.append(
            (f"single-request latency, gateway / {BASELINE}", g["latency_ratio"], "<= 1.05", g["latency_ratio"] <= 1.05)
        )
        targets.append(
            (
                f"throughput at C={concurrency}, gateway / {BASELINE}",
                g["throughput_ratio"],
                ">= 0.95",
                g["throughput_ratio"] >= 0.95,
            )
        )
    if "triton-http" in by_path:
        h = by_path["triton-http"]
        targets.append(
            (
                f"throughput at C={concurrency}, triton-http / {BASELINE}",
                h["throughput_ratio"],
                ">= 0.90",
                h["throughput_ratio"] >= 0.90,
            )
        )
    return [{"target": t, "measured": round(v, 3), "required": req, "met": bool(ok)} for t, v, req, ok in targets]


def print_paths(report: dict) -> None:
    print(
        f"\n| path | latency p50 (1 client) | vs {BASELINE} | throughput (C={report['concurrency']}) | vs {BASELINE} "
        "| CPU per image: server / gateway | errors |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in report["paths"]:
        print(
            f"| {r['path']} | {r['latency_p50_s']:.3f} s | {r['latency_ratio']:.3f}x | "
            f"{r['throughput_images_per_s']:.2f} img/s | {r['throughput_ratio']:.3f}x | "
            f"{r['server_cpu_s_per_image'] * 1000:.0f} / {r['gateway_cpu_s_per_image'] * 1000:.1f} ms | {r['errors'] or '-'} |"
        )
