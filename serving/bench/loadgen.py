"""Load generation over gRPC: closed loop at a fixed concurrency, open loop with Poisson arrivals.

Each worker thread keeps its own client (a gRPC stream serves one request at a time). `url` is a
server's gRPC address, or a factory of clients with the same generate(**fields)."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import threading
import time

import numpy as np

from serving.client.kserve import LdmClient
from serving.client.retry import status_code


@dataclass
class LoadResult:
    mode: str
    offered: float  # concurrency (closed) or requests/s (open)
    latencies: list = field(default_factory=list)  # seconds, successful requests
    errors: dict = field(default_factory=dict)  # code -> count
    wall_seconds: float = 0.0

    def summary(self) -> dict:
        lat = np.array(self.latencies) if self.latencies else np.array([np.nan])
        return {
            "mode": self.mode,
            "offered": self.offered,
            "completed": len(self.latencies),
            "errors": self.errors,
            "throughput_images_per_s": len(self.latencies) / self.wall_seconds if self.wall_seconds else 0.0,
            "latency_mean_s": float(np.mean(lat)),
            "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p95_s": float(np.percentile(lat, 95)),
            "latency_p99_s": float(np.percentile(lat, 99)),
        }


class _Clients(threading.local):
    """One client per worker thread: LdmClient(target) for a server URL, or target() when it is a
    factory (e.g. serving.bench.inprocess.EngineClient, the engine without Triton)."""

    def __init__(self, target):
        self.client = target() if callable(target) else LdmClient(target)


def _timed(clients, fields, seed, result, lock):
    start = time.perf_counter()
    try:
        clients.client.generate(seed=seed, **fields)
    except Exception as exc:  # counted by its status code (any client's); a benchmark keeps going
        code = status_code(exc)
        with lock:
            result.errors[code] = result.errors.get(code, 0) + 1
        return
    with lock:
        result.latencies.append(time.perf_counter() - start)


def _request_fields(fields, i: int) -> dict:
    """Request i's fields: `fields` is one field set, or a list of them taken in turn (a mix)."""
    return fields[i % len(fields)] if isinstance(fields, list) else fields


def closed_loop(url: str, fields, concurrency: int, requests: int, seed0: int = 0) -> LoadResult:
    """`concurrency` clients each send their next request as soon as the last one returns."""
    result, lock, clients = LoadResult("closed", concurrency), threading.Lock(), _Clients(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: _timed(clients, _request_fields(fields, i), seed0 + i, result, lock), range(requests)))
    result.wall_seconds = time.perf_counter() - start
    return result


def open_loop(url: str, fields, rate: float, requests: int, seed0: int = 0, max_in_flight: int = 256) -> LoadResult:
    """Requests arrive as a Poisson process at `rate` per second, whatever the server's pace."""
    result, lock, clients = LoadResult("open", rate), threading.Lock(), _Clients(url)
    gaps = np.random.default_rng(seed0).exponential(1.0 / rate, requests)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_in_flight) as pool:
        due = start
        for i, gap in enumerate(gaps):
            due += gap
            time.sleep(max(0.0, due - time.perf_counter()))
            pool.submit(_timed, clients, _request_fields(fields, i), seed0 + i, result, lock)
    result.wall_seconds = time.perf_counter() - start
    return result
