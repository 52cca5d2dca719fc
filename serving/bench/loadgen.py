"""Load generation over gRPC: closed loop at a fixed concurrency, open loop with Poisson arrivals.

Each worker thread keeps its own client (a gRPC stream serves one request at a time)."""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import threading
import time

import numpy as np
from tritonclient.utils import InferenceServerException

from serving.client.kserve import LdmClient


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
    def __init__(self, url):
        self.client = LdmClient(url)


def _timed(clients, fields, seed, result, lock):
    start = time.perf_counter()
    try:
        clients.client.generate(seed=seed, **fields)
    except InferenceServerException as exc:
        with lock:
            result.errors[str(exc.status())] = result.errors.get(str(exc.status()), 0) + 1
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
