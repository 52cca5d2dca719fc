"""`ldm soak`: mixed load against a real server for N minutes, then the accounting.

Workers send, in a seeded random mix: plain generations over Triton's gRPC stream and over its
HTTP (the unary front) at several sizes, step counts and guidance scales; img2img and regional
requests; requests the client cancels after their first progress message; requests whose
`timeout_s` is shorter than their work; and bad inputs (out of range, NaN, empty, unknown).
Every request is classified by what came back: an image (the right shape), a coded error, or
cancelled by the client. Anything else (an exception without a code, no answer within the
client's timeout, an image of the wrong shape, a code the request's kind cannot get) is lost,
and a soak passes only with none lost.

Meanwhile the resident memory and open file descriptors of tritonserver and of each of its
children (the python-backend stubs) are sampled; after the warm-up, tritonserver's and the
stubs' together must stay within +-10% of their values at the end of the warm-up. At the end
the server's ldm_* counters (the change over the run) are compared with the client's own
counts.
"""

from typing import Any
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import json
import math
from pathlib import Path
import random
import re
import threading
import time
import urllib.request

import numpy as np

PROMPTS = [  # inside the default model's grammar
    "a large red circle on the left of a black background",
    "a small green square at the top of a white background",
    "a yellow triangle on the right of a grey background",
    "a magenta circle above a cyan square on a black background",
]
# kind -> share of the requests
MIX = {
    "grpc": 0.30,
    "http": 0.15,
    "img2img": 0.08,
    "regional": 0.07,
    "cancel": 0.12,
    "timeout": 0.08,
    "invalid": 0.20,
}
# the codes each kind may end with besides its image (UNAVAILABLE: the queue was full)
ALLOWED_ERRORS = {
    "grpc": {"UNAVAILABLE"},
    "http": {"UNAVAILABLE"},
    "img2img": {"UNAVAILABLE"},
    "regional": {"UNAVAILABLE"},
    "cancel": {"UNAVAILABLE"},
    "timeout": {"UNAVAILABLE"},
    "invalid": {"INVALID_ARG"},
}
COUNTERS = (
    "ldm_images_completed_total",
    "ldm_cancellations_total",
    "ldm_deadline_expirations_total",
    "ldm_rejections_total",
    "ldm_failures_total",
)
TOLERANCE = 0.10  # RSS and open fds after the warm-up: within +-10% of the warm-up's last sample


def add_arguments(parser):
    parser.add_argument("--minutes", type=float, default=20.0, help="how long the load runs (default: %(default)s)")
    parser.add_argument("--checkpoint", help="diffusers checkpoint to export and serve (default: the shipped model)")
    parser.add_argument("--repo", help="serve this exported repository instead of exporting one")
    parser.add_argument("--out", default="out/soak", help="folder for the repository, logs and soak.json")
    parser.add_argument("--concurrency", type=int, default=6, help="client threads (default: %(default)s)")
    parser.add_argument(
        "--max-steps", type=int, default=25, help="largest step count of a generation (default: %(default)s)"
    )
    parser.add_argument(
        "--sample-s", type=float, default=10.0, help="seconds between RSS/fd samples (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.2,
        help="share of the run before RSS and fds must stay flat (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)


@dataclass
class Outcome:
    kind: str
    result: str  # "image", "cancelled", "error:<CODE>" or "lost:<why>"
    seconds: float


class RequestMaker:
    """Request i of the mix: (kind, fields, expected image side) from a seeded generator."""

    def __init__(self, size: int, size_multiple: int, max_size: int, max_steps: int):
        self.sizes = sorted(
            {s for s in (size - size_multiple, size, size + size_multiple, max_size) if size_multiple <= s <= max_size}
        )
        self.size, self.max_steps = size, max_steps

    @classmethod
    def for_repository(cls, repo, max_steps: int) -> "RequestMaker":
        info = json.loads((Path(repo) / "pipeline" / "1" / "pipeline.json").read_text())
        return cls(int(info["native_size"]), int(info["size_multiple"]), int(info["max_size"]), max_steps)

    def make(self, rng: random.Random) -> tuple:
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        side = rng.choice(self.sizes)
        fields: dict[str, Any] = dict(
            prompt=rng.choice(PROMPTS),
            seed=rng.randrange(2**31),
            steps=rng.randint(1, self.max_steps),
            guidance_scale=round(rng.uniform(1.0, 8.0), 2),
            height=side,
            width=side,
        )
        if kind == "img2img":
            fields.update(
                task="img2img",
                strength=0.6,
                steps=max(2, fields["steps"]),
                init_image=np.random.default_rng(fields["seed"]).integers(0, 256, (side, side, 3), dtype=np.uint8),
            )
        elif kind == "regional":
            fields.update(region_prompts=["a red circle", "a blue square"], region_divisions="1,1")
        elif kind == "cancel":
            fields.update(steps=self.max_steps, progress_every=1)
        elif kind == "timeout":
            fields.update(steps=self.max_steps, timeout_s=0.01)
        elif kind == "invalid":
            fields.update(rng.choice(self.bad_inputs()))
        return kind, fields, side

    def bad_inputs(self) -> list:
        return [
            dict(steps=0),
            dict(steps=100_000),
            dict(guidance_scale=math.nan),
            dict(guidance_scale=math.inf),
            dict(height=self.size + 1),
            dict(width=100_000),
            dict(prompt=""),
            dict(prompt="\u200b\u200b"),
            dict(eta=-1.0),
            dict(timeout_s=-5.0),
            dict(region_mode="nonsense", region_prompts=["a", "b"], region_divisions="1,1"),
            dict(task="img2img"),
            dict(region_prompts=["a", "b"], region_divisions="1,1,1"),
        ]


def send(grpc_url: str, http_url: str, kind: str, fields: dict, side: int, timeout_s: float) -> str:
    """One request; what came back, classified."""
    from serving.client.kserve import LdmClient
    from serving.client.retry import status_code

    class LeaveNow(Exception):
        pass

    def leave(_generation):
        raise LeaveNow

    protocol, url = ("http", http_url) if kind == "http" else ("grpc", grpc_url)
    try:
        with LdmClient(url, protocol=protocol, timeout_s=timeout_s) as client:
            image = client.run(on_progress=leave if kind == "cancel" else None, **fields).image
    except LeaveNow:
        return "cancelled"
    except Exception as exc:
        code = status_code(exc)
        if code == "DEADLINE_EXCEEDED" or not code.isupper():
            return f"lost:{code}:{str(exc)[:160]}"
        return f"error:{code}" if code in ALLOWED_ERRORS[kind] else f"lost:unexpected {code}:{str(exc)[:160]}"
    if kind == "invalid":
        return "lost:bad input got an image"
    if image.shape != (side, side, 3) or image.dtype != np.uint8:
        return f"lost:image {image.dtype} {list(image.shape)}"
    return "image"


def process_tree(pid: int) -> dict:
    """RSS (MB) and open fds of a process and each of its children, by 'name pid'."""
    import psutil

    root = psutil.Process(pid)
    sample = {}
    for p in [root] + root.children(recursive=True):
        try:
            sample[f"{p.name()} {p.pid}"] = {"rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds()}
        except psutil.NoSuchProcess:
            pass
    return sample


def totals(tree: dict) -> dict:
    """A sample of the tree as what is judged: tritonserver itself, and its stubs together (a
    stub that Triton restarts comes back with another pid)."""
    server = next(v for n, v in tree.items() if n.startswith("tritonserver"))
    stubs = [v for n, v in tree.items() if not n.startswith("tritonserver")]
    return {"tritonserver": server, "stubs": {m: sum(v[m] for v in stubs) for m in ("rss_mb", "fds")}}


def flatness(samples: list, warmup_s: float) -> dict:
    """For tritonserver and for its stubs together, per measure: the value at the end of the
    warm-up, the range after it, and whether every later sample is within TOLERANCE of it."""
    report = {}
    after = [totals(s["tree"]) for s in samples if s["t"] >= warmup_s]
    base = [totals(s["tree"]) for s in samples if s["t"] < warmup_s]
    if not after or not base:
        return report
    for name in base[-1]:
        for measure in ("rss_mb", "fds"):
            start = base[-1][name][measure]
            values = [s[name][measure] for s in after]
            low, high = min(values), max(values)
            report[f"{name} {measure}"] = {
                "at_warmup_end": start,
                "min": low,
                "max": high,
                "flat": start * (1 - TOLERANCE) <= low and high <= start * (1 + TOLERANCE),
            }
    return report


def counters(metrics_url: str) -> dict:
    """The server's ldm_*_total counters."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(ldm_\w+_total)\{[^}]*\} (\S+)$", text, re.M)}


def account(outcomes: list, before: dict, after: dict) -> dict:
    """The client's counts beside the server's counter deltas, and whether they agree.

    Exact: images completed = images received, plus the cancelled requests the server finished
    before it saw the cancel (at most all of them). Deadline expirations = the timeout kind's
    UNAVAILABLE answers (no other kind has a timeout short enough). Server cancellations <=
    client cancellations (a cancel can arrive after the image). No model failures."""
    results = Counter(o.result for o in outcomes)
    by_kind = Counter((o.kind, o.result.split(":")[0]) for o in outcomes)
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in COUNTERS}
    images = results["image"]
    cancelled = results["cancelled"]
    timeouts = sum(1 for o in outcomes if o.kind == "timeout" and o.result == "error:UNAVAILABLE")
    unavailable_other = sum(1 for o in outcomes if o.kind != "timeout" and o.result == "error:UNAVAILABLE")
    checks = {
        "images": images <= delta["ldm_images_completed_total"] <= images + cancelled,
        "cancellations": delta["ldm_cancellations_total"] <= cancelled,
        "deadline_expirations": delta["ldm_deadline_expirations_total"] == timeouts,
        "rejections": delta["ldm_rejections_total"] == unavailable_other,
        "failures": delta["ldm_failures_total"] == 0,
    }
    return {
        "requests": len(outcomes),
        "results": dict(sorted(results.items())),
        "by_kind": {f"{k} {r}": n for (k, r), n in sorted(by_kind.items())},
        "lost": sum(n for r, n in results.items() if r.startswith("lost")),
        "server_counter_deltas": delta,
        "client": {
            "images": images,
            "cancelled": cancelled,
            "timeouts_answered": timeouts,
            "unavailable_other": unavailable_other,
            "invalid_arg": results["error:INVALID_ARG"],
        },
        "counters_consistent": checks,
    }


def soak(
    grpc_url: str,
    http_url: str,
    metrics_url: str,
    server_pid: int,
    seconds: float,
    maker: RequestMaker,
    concurrency: int = 6,
    sample_s: float = 10.0,
    warmup_fraction: float = 0.2,
    seed: int = 0,
    log=print,
) -> dict:
    """Runs the mix for `seconds` against a running server; returns the report."""
    outcomes, lock = [], threading.Lock()
    stop = threading.Event()
    samples = []
    start = time.monotonic()
    request_timeout = 120.0  # a generation here takes seconds; one that takes this long is lost

    def worker(index: int):
        rng = random.Random(seed * 1000 + index)
        while not stop.is_set():
            kind, fields, side = maker.make(rng)
            began = time.monotonic()
            result = send(grpc_url, http_url, kind, fields, side, request_timeout)
            with lock:
                outcomes.append(Outcome(kind, result, time.monotonic() - began))
                if result.startswith("lost"):
                    log(f"LOST {kind}: {result}")

    def sampler():
        while True:
            samples.append({"t": time.monotonic() - start, "tree": process_tree(server_pid)})
            with lock:
                done = len(outcomes)
            log(
                f"soak t={samples[-1]['t']:.0f}s requests={done} "
                + " ".join(f"[{n}: {v['rss_mb']:.0f} MB, {v['fds']} fds]" for n, v in samples[-1]["tree"].items())
            )
            if stop.wait(sample_s):
                samples.append({"t": time.monotonic() - start, "tree": process_tree(server_pid)})
                return

    before = counters(metrics_url)
    sampling = threading.Thread(target=sampler, daemon=True)
    sampling.start()
    with ThreadPoolExecutor(concurrency) as pool:
        for i in range(concurrency):
            pool.submit(worker, i)
        try:
            stop.wait(seconds)
        finally:  # Ctrl-C too: the workers end after their request
            stop.set()
    sampling.join()
    time.sleep(1.5)  # the pipeline copies its counters to the metrics port every 0.5 s
    after = counters(metrics_url)
    report = account(outcomes, before, after)
    report.update(
        seconds=time.monotonic() - start,
        concurrency=concurrency,
        mix=MIX,
        latency_s={
            kind: _quantiles([o.seconds for o in outcomes if o.kind == kind and o.result == "image"]) for kind in MIX
        },
        memory_and_fds=flatness(samples, seconds * warmup_fraction),
        samples=samples,
    )
    report["passed"] = (
        report["lost"] == 0
        and all(report["counters_consistent"].values())
        and all(v["flat"] for v in report["memory_and_fds"].values())
    )
    return report


def _quantiles(values: list) -> dict:
    if not values:
        return {}
    return {"n": len(values), "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def print_summary(report: dict, log=print) -> None:
    log(f"soak: {report['requests']} requests in {report['seconds']:.0f} s, lost {report['lost']}")
    log("  results: " + ", ".join(f"{k} {v}" for k, v in report["results"].items()))
    log("  server counter deltas: " + ", ".join(f"{k} {v:.0f}" for k, v in report["server_counter_deltas"].items()))
    log(
        "  counters consistent with the client: "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in report["counters_consistent"].items())
    )
    for name, v in report["memory_and_fds"].items():
        log(
            f"  {name}: {v['at_warmup_end']:.1f} at warm-up end, then {v['min']:.1f}..{v['max']:.1f} "
            f"({'flat' if v['flat'] else 'NOT flat'} within +-{TOLERANCE:.0%})"
        )
    log(f"soak {'PASSED' if report['passed'] else 'FAILED'}")


def run(args) -> int:
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.defaults import default_checkpoint
    from serving.triton.server import TritonServer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repo = Path(args.repo) if args.repo else out / "model_repository"
    if not args.repo:
        checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
        write_repository(checkpoint, repo, pipeline_parameters=pipeline_parameters(), log=lambda *a: None)
    maker = RequestMaker.for_repository(repo, args.max_steps)
    print(f"soak: {args.minutes} min, {args.concurrency} clients, sizes {maker.sizes}, repository {repo}", flush=True)
    with TritonServer(repo, log_file=out / "tritonserver.log") as server:
        report = soak(
            server.grpc_url,
            server.http_url,
            server.metrics_url,
            server.process.pid,
            args.minutes * 60,
            maker,
            args.concurrency,
            args.sample_s,
            args.warmup_fraction,
            args.seed,
            log=lambda m: print(m, flush=True),
        )
    report["repository"] = str(repo)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    print_summary(report, log=lambda m: print(m, flush=True))
    print(f"wrote {out / 'soak.json'}", flush=True)
    return 0 if report["passed"] else 1
