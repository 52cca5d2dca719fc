"""`python -m serving.bench.gpu`: the GPU table in one run (scripts/gpu_bench.sh on the lent GPU).

On an SD-1.5-size random-weight checkpoint (serving/bench/sd15.py; 512 px, 50 DDIM steps,
guidance 7.5), in this order, each stage printed as it ends and the JSON rewritten after it:
  1. diffusers StableDiffusionPipeline (fp16, SDPA), one request at a time, on the same GPU;
  2. the UNet alone through the torch runner (CUDA graphs) at the rows each concurrency gives
     (2 per request): the ceiling of images/s the server could reach at that load;
  3. the full Triton stack with the torch runner: batch-1 latency unloaded, closed-loop throughput
     at C = 1, 4, 16, 32, Poisson arrivals at 80% of the best throughput (p50/p99);
  4. the issue's targets as ratios, next to the anchor numbers.
A stage whose expected time (from the UNet timings) no longer fits the time budget is skipped and
says so. If tritonserver cannot start here, stage 3 runs the same engine without Triton and says so.
`--device cpu --small` runs the identical code path on the tiny checkpoint (the CI test).
"""

from typing import Any
import argparse
import json
import os
from pathlib import Path
import platform
import time

import numpy as np

ANCHORS = {  # H200, SD-1.5-size UNet, random weights, fp16, measured 2026-11-26 by the project
    "unet_eager_ms": {"1": 25.5, "8": 35.6, "64": 185.0},
    "unet_cuda_graph_ms": {"2": 12.0, "8": 27.3},
    "unet_compiled_graph_ms": {"2": 7.0, "16": 37.8},
    "batch1_image_s_with_graphs": 0.6,
    "images_per_s_large_batch": {"eager": 3.5, "compiled": 4.5, "physical_ceiling": 9.8},
    "published_tensorrt_s_per_image": {"A100": 0.82, "H100 PCIe": 0.75},
}
TARGETS = (  # (name, report key, comparison, required, stretch)
    ("throughput at C=32 (img/s)", "c32_throughput", ">=", 4.5, 6.0),
    ("batch-1 end-to-end latency (s)", "unloaded_latency_s", "<=", 0.65, 0.45),
    ("throughput at C=32 / diffusers one at a time", "c32_vs_diffusers", ">=", 3.0, None),
    ("p99 at 80% of max / unloaded latency", "p99_ratio", "<=", 3.0, None),
)
PROMPT = "a large red circle on the left of a black background"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m serving.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out/gpu-bench"), help="JSON and logs (default: $OUT)")
    parser.add_argument(
        "--work", default="/tmp/ldm-gpu-bench", help="checkpoint and repository (large; not under --out)"
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="the tiny checkpoint, few steps and requests (CPU test)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--concurrency", help="closed-loop levels (default 1,4,16,32; --small: 1,4)")
    parser.add_argument("--waves", type=int, default=2, help="requests per client in each closed loop")
    parser.add_argument("--max-active", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="torch.compile the runner (~1 min per bucket)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting stages after this long")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.small else 50)
    args.concurrency = [int(c) for c in (args.concurrency or ("1,4" if args.small else "1,4,16,32")).split(",")]
    return args


class Report:
    """The JSON under --out, rewritten after every stage, so a run cut short keeps what it measured."""

    def __init__(self, out: Path, budget_s: float):
        self.path = out / "gpu_bench.json"
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"stages": {}, "skipped": []}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fits(self, stage: str, expected_s: float) -> bool:
        if self.elapsed() + expected_s <= self.budget_s:
            return True
        self.data["skipped"].append(
            {"stage": stage, "expected_s": round(expected_s, 1), "elapsed_s": round(self.elapsed(), 1)}
        )
        say(f"SKIPPED {stage}: expected {expected_s:.0f} s, {self.budget_s - self.elapsed():.0f} s of the budget left")
        self.save()
        return False

    def stage(self, name: str, result) -> None:
        self.data["stages"][name] = result
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=float))


def say(text: str) -> None:
    print(f"[gpu-bench] {text}", flush=True)


def environment(device: str) -> dict:
    import diffusers
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "device": device,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    return env


def build_checkpoint(args, work: Path) -> Path:
    if args.small:
        from training.tiny_checkpoint import write_tiny_checkpoint

        path = work / "tiny"
        return path if (path / "model_index.json").is_file() else write_tiny_checkpoint(path)
    from serving.bench.sd15 import write_sd15_checkpoint

    return write_sd15_checkpoint(work / "sd15-random", device=args.device)


def diffusers_one_at_a_time(checkpoint, args, size: int, runs: int) -> dict:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, dtype=dtype).to(args.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latencies = []
    for i in range(runs + 1):  # the first is a warm-up
        start = time.perf_counter()
        pipe(
            PROMPT,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=size,
            width=size,
            generator=torch.Generator(args.device).manual_seed(i),
            output_type="np",
        )
        _synchronize(args.device)
        latencies.append(time.perf_counter() - start)
    del pipe
    _release(args.device)
    latency = float(np.median(latencies[1:]))
    return {"latency_s": latency, "throughput": 1.0 / latency, "runs": runs}


def unet_ceiling(checkpoint, args, rows_per_level: dict, buckets: tuple) -> dict:
    """Milliseconds per UNet call through the runner (host copies included, as the engine pays),
    and the images/s a server limited only by the UNet would reach at that load."""
    from serving.models.torch_options import TorchOptions
    from serving.models.torch_runner import TorchModels

    options = TorchOptions(device=args.device, buckets=buckets, max_rows=buckets[-1], compile=args.compile)
    models = TorchModels(checkpoint, options, components=("unet",), log=say)
    out: dict[str, Any] = {"memory_plan": models.memory_plan, "levels": {}}
    for clients, rows in rows_per_level.items():
        sample, timestep, context = models.native_examples(rows)["unet"]
        sample = np.random.default_rng(0).standard_normal(sample.shape, dtype=np.float32)
        for _ in range(3):
            models.unet(sample, timestep + 500, context)
        repeats = 5 if args.small else 20
        _synchronize(args.device)
        start = time.perf_counter()
        for _ in range(repeats):
            models.unet(sample, timestep + 500, context)
        _synchronize(args.device)
        seconds = (time.perf_counter() - start) / repeats
        out["levels"][str(clients)] = {
            "rows": rows,
            "ms_per_step": seconds * 1e3,
            "ceiling_images_per_s": clients / (args.steps * seconds),
        }
        say(
            f"UNet alone, {rows} rows: {seconds * 1e3:.1f} ms/step -> ceiling {clients / (args.steps * seconds):.2f} img/s at C={clients}"
        )
    del models
    _release(args.device)
    return out


def export_repository(checkpoint, args, repo: Path, buckets: tuple) -> None:
    from export.cli import pipeline_parameters
    from export.repository import write_repository

    params = pipeline_parameters(
        unet="torch",
        text_vae="torch",
        max_rows=buckets[-1],
        max_active=args.max_active,
        max_queue=512,
        torch_buckets=",".join(map(str, buckets)),
        torch_compile=args.compile,
    )
    params.update(default_steps=args.steps, default_guidance_scale=args.guidance)
    write_repository(checkpoint, repo, gpu=args.device == "cuda", pipeline_parameters=params, log=say)


def serve_and_load(target, args, report: Report, fields: dict, step_ms: dict) -> dict:
    """Stage 3 against `target` (a gRPC URL or a client factory)."""
    from serving.bench.loadgen import closed_loop, open_loop

    result = {"closed": {}}

    def expected(clients, requests):  # waves of the UNet step at that load, plus a third for the rest
        return 1.3 * (requests / clients) * args.steps * step_ms.get(clients, max(step_ms.values())) / 1e3

    closed_loop(target, fields, 2, 4)  # warm-up: first calls, allocator, text cache
    unloaded = closed_loop(target, fields, 1, 4 if args.small else 8, seed0=1).summary()
    result["unloaded"] = unloaded
    say(f"batch-1 unloaded: p50 {unloaded['latency_p50_s']:.3f} s, p99 {unloaded['latency_p99_s']:.3f} s")
    report.stage("server", result)
    for clients in args.concurrency:
        requests = max(args.waves * clients, 4)
        if not report.fits(f"closed loop C={clients}", expected(clients, requests)):
            break
        run = closed_loop(target, fields, clients, requests, seed0=1000 * clients).summary()
        result["closed"][str(clients)] = run
        say(
            f"closed loop C={clients}: {run['throughput_images_per_s']:.2f} img/s, p50 {run['latency_p50_s']:.3f} s, "
            f"p99 {run['latency_p99_s']:.3f} s, errors {run['errors']}"
        )
        report.stage("server", result)
    if result["closed"]:
        best = max(r["throughput_images_per_s"] for r in result["closed"].values())
        rate = 0.8 * best
        requests = max(8, int(rate * (2 if args.small else 30)))  # ~30 s of arrivals on the GPU
        if report.fits("Poisson at 80% of max", requests / rate + 2 * unloaded["latency_p99_s"]):
            run = open_loop(target, fields, rate, requests, seed0=7).summary()
            result["poisson_80"] = {"rate": rate, **run}
            say(
                f"Poisson {rate:.2f} req/s (80% of {best:.2f}): p50 {run['latency_p50_s']:.3f} s, "
                f"p99 {run['latency_p99_s']:.3f} s, {run['throughput_images_per_s']:.2f} img/s, errors {run['errors']}"
            )
            report.stage("server", result)
    return result


def row_cap_metric(metrics_url: str):
    import urllib.request

    for line in urllib.request.urlopen(metrics_url, timeout=5).read().decode().splitlines():
        if line.startswith("ldm_unet_row_cap{"):
            return int(float(line.split()[-1]))
    return None


def targets(data: dict) -> list:
    stages = data["stages"]
    server = stages.get("server", {})
    closed = server.get("closed", {})
    values = {}
    if "32" in closed:
        values["c32_throughput"] = closed["32"]["throughput_images_per_s"]
        if "diffusers" in stages:
            values["c32_vs_diffusers"] = values["c32_throughput"] / stages["diffusers"]["throughput"]
    if "unloaded" in server:
        values["unloaded_latency_s"] = server["unloaded"]["latency_p50_s"]
        if "poisson_80" in server:
            values["p99_ratio"] = server["poisson_80"]["latency_p99_s"] / values["unloaded_latency_s"]
    rows = []
    for name, key, op, required, stretch in TARGETS:
        value = values.get(key)
        met = None if value is None else (value >= required if op == ">=" else value <= required)
        stretch_met = (
            None if value is None or stretch is None else (value >= stretch if op == ">=" else value <= stretch)
        )
        rows.append(
            {
                "target": name,
                "measured": value,
                "required": f"{op} {required}",
                "met": met,
                "stretch": None if stretch is None else f"{op} {stretch}",
                "stretch_met": stretch_met,
                "measured_over_required": None if value is None else value / required,
            }
        )
    return rows


def print_table(data: dict) -> None:
    stages = data["stages"]
    env = stages.get("environment", {})
    print(
        f"\n## GPU table: {env.get('gpu', env.get('device'))}, {env.get('date_utc')} UTC, "
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, diffusers {env.get('diffusers')}"
    )
    server = stages.get("server", {})
    print(f"server path: {server.get('path', 'not run')}; memory plan: {server.get('row_cap', '?')} rows cap")
    print("\n| run | throughput (img/s) | p50 / p99 (s) |\n|---|---|---|")
    if "diffusers" in stages:
        d = stages["diffusers"]
        print(f"| diffusers one at a time | {d['throughput']:.2f} | {d['latency_s']:.3f} |")
    if "unloaded" in server:
        u = server["unloaded"]
        print(
            f"| server, batch 1 unloaded | {u['throughput_images_per_s']:.2f} | {u['latency_p50_s']:.3f} / {u['latency_p99_s']:.3f} |"
        )
    ceiling = stages.get("unet_ceiling", {}).get("levels", {})
    for clients, run in server.get("closed", {}).items():
        c = ceiling.get(clients)
        extra = (
            f" (UNet ceiling {c['ceiling_images_per_s']:.2f}, {c['ms_per_step']:.1f} ms/step at {c['rows']} rows)"
            if c
            else ""
        )
        print(
            f"| server, closed loop C={clients} | {run['throughput_images_per_s']:.2f}{extra} | "
            f"{run['latency_p50_s']:.3f} / {run['latency_p99_s']:.3f} |"
        )
    if "poisson_80" in server:
        p = server["poisson_80"]
        print(
            f"| server, Poisson {p['rate']:.2f} req/s (80% of max) | {p['throughput_images_per_s']:.2f} | "
            f"{p['latency_p50_s']:.3f} / {p['latency_p99_s']:.3f} |"
        )
    print("\n| target | measured | required | met | stretch | met |\n|---|---|---|---|---|---|")
    for row in data.get("targets", []):
        value = "n/a" if row["measured"] is None else f"{row['measured']:.3f}"
        print(
            f"| {row['target']} | {value} | {row['required']} | {_yes(row['met'])} | {row['stretch'] or ''} | "
            f"{_yes(row['stretch_met']) if row['stretch'] else ''} |"
        )
    print(f"\nanchors (the project's standalone H200 probe, 2026-11-26; README GPU path): {json.dumps(ANCHORS)}")
    if data["skipped"]:
        print(f"skipped for the time budget: {[s['stage'] for s in data['skipped']]}")


def _yes(value) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report = Report(out, args.budget_s)
    report.data["arguments"] = {k: v for k, v in vars(args).items()}
    report.stage("environment", environment(args.device))
    say(f"environment: {report.data['stages']['environment']}")

    started = time.monotonic()
    checkpoint = build_checkpoint(args, work)
    from families.checkpoint import CheckpointInfo

    info = CheckpointInfo.read(checkpoint)
    size = info.native_size
    report.stage(
        "checkpoint",
        {
            "path": str(checkpoint),
            "size": size,
            "steps": args.steps,
            "guidance": args.guidance,
            "seconds": round(time.monotonic() - started, 1),
        },
    )
    say(f"checkpoint {checkpoint} ({size} px) in {time.monotonic() - started:.0f} s")

    report.stage("diffusers", diffusers_one_at_a_time(checkpoint, args, size, runs=1 if args.small else 3))
    say(f"diffusers one at a time: {report.data['stages']['diffusers']['latency_s']:.3f} s/image")

    rows = {c: 2 * min(c, args.max_active) for c in args.concurrency}
    from serving.models.torch_options import default_buckets

    buckets = default_buckets(args.device, max(rows.values()))
    ceiling = unet_ceiling(checkpoint, args, rows, buckets)
    report.stage("unet_ceiling", ceiling)
    step_ms = {c: level["ms_per_step"] for c, level in ((int(k), v) for k, v in ceiling["levels"].items())}

    repo = work / "repo"
    export_repository(checkpoint, args, repo, buckets)
    fields = dict(prompt=PROMPT, steps=args.steps, guidance_scale=args.guidance, height=size, width=size)
    server_result = run_server_stage(repo, args, report, fields, step_ms, out)
    report.stage("server", server_result)
    report.data["targets"] = targets(report.data)
    report.save()
    print_table(report.data)
    say(f"done in {report.elapsed():.0f} s; wrote {report.path}")
    return 0


def run_server_stage(repo: Path, args, report: Report, fields: dict, step_ms: dict, out: Path) -> dict:
    from serving.triton.server import TritonServer

    started = time.monotonic()
    server = TritonServer(repo, log_file=out / "tritonserver.log")
    try:
        server.start(timeout=300)
    except Exception as exc:  # e.g. no libpython for the stub on this machine: measure the engine alone
        say(f"tritonserver did not start ({str(exc).splitlines()[0]}); measuring the same engine without Triton")
        from serving.bench.inprocess import InProcessPipeline

        pipeline = InProcessPipeline(repo, args.device, log=say)
        try:
            result = serve_and_load(pipeline.client, args, report, fields, step_ms)
        finally:
            pipeline.stop()
        return {
            "path": f"engine in process, no Triton (tritonserver failed: {str(exc).splitlines()[0]})",
            "row_cap": pipeline.service.engine.stats.row_cap,
            **result,
        }
    try:
        startup = time.monotonic() - started
        row_cap = row_cap_metric(server.metrics_url)
        say(f"tritonserver ready in {startup:.0f} s (model load and graph capture); row cap {row_cap}")
        result = serve_and_load(server.grpc_url, args, report, fields, step_ms)
        return {
            "path": "tritonserver (gRPC stream) with the torch runner",
            "startup_s": startup,
            "row_cap": row_cap,
            **result,
        }
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
