"""`ldm bench --regional`: what regional prompts cost, measured in one run.

1. Per denoising step, in this process with the engine's own model calls (ONNX Runtime): one
   job's UNet rows and milliseconds per step (UNet call, combine, DDIM update), plain against
   regions in latent and attention mode for R = 2, 3, 4.
2. How attention-mode jobs of different K = R + 1 share a step: grouped by K (one call per K,
   what the scheduler does) against one call padded to the largest K (zero weights), for an
   even and a skewed mix.
3. The server at concurrency 16: all plain requests, and mixes with every fourth request
   regional (R = 2, halves) in each mode, on one server, taking turns for several rounds.
"""

from typing import TYPE_CHECKING
import json
from pathlib import Path
import time

import numpy as np

from serving.core.config import PipelineConfig
from serving.bench.bench import PROMPTS

REGION_FIELDS = dict(
    prompt="a red circle to the left of a blue square on a black background",
    region_prompts=[
        "a small red circle on the left of a black background",
        "a small blue square on the right of a black background",
    ],
    region_divisions="1,1",
)
COUNTS = (2, 3, 4)


def region_request(count: int, mode: str) -> dict:
    """R = count columns of one-object prompts."""
    prompts = [f"a small {c} circle in the centre of a black background" for c in ("red", "green", "blue", "yellow")]
    return dict(
        prompt=PROMPTS[0], region_prompts=prompts[:count], region_divisions=",".join("1" * count), region_mode=mode
    )


def step_costs(repo, steps: int, guidance: float, size: int, rounds: int = 5) -> list:
    """[{kind, regions, rows, cpu_ms_per_step, ms_per_step}] of one job alone in the engine, over
    its steps between admission and decoding. CPU time (all of this process's threads) is the
    work, steady on a shared machine; wall time is the fastest of `rounds` turns."""
    from serving.client.kserve import request_arrays
    from serving.core.service import PipelineAssets, PipelineService
    from serving.models.onnx import LocalModels

    models = LocalModels(repo)
    assets = PipelineAssets.read(Path(repo) / "pipeline" / "1")
    kinds = [("plain", 0, dict(prompt=PROMPTS[0]))] + [
        (mode, r, region_request(r, mode)) for r in COUNTS for mode in ("latent", "attention")
    ]
    rows = [{"kind": kind, "regions": count, "rows": None, "cpu": [], "wall": []} for kind, count, _ in kinds]
    for _ in range(rounds):
        for row, (_, _, fields) in zip(rows, kinds):
            service = PipelineService(assets, PipelineConfig(), models)
            sink = _Sink()
            service.submit(
                request_arrays(seed=0, steps=steps, guidance_scale=guidance, height=size, width=size, **fields), sink
            )
            service.engine.run_iteration()  # admission (text encoding) and the first step
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(steps - 2):
                service.engine.run_iteration()
            row["cpu"].append(1000 * (time.process_time() - cpu) / (steps - 2))
            row["wall"].append(1000 * (time.perf_counter() - wall) / (steps - 2))
            row["rows"] = service.engine.stats.last_rows
            while service.engine.run_iteration():  # the last step and decoding
                pass
            if sink.error:
                raise RuntimeError(sink.error)
    return [
        {
            "kind": r["kind"],
            "regions": r["regions"],
            "rows": r["rows"],
            "cpu_ms_per_step": round(float(np.median(r["cpu"])), 2),
            "ms_per_step": round(min(r["wall"]), 2),
        }
        for r in rows
    ]


PADDING_MIXES = {"8 jobs K=3 + 8 jobs K=5": ((8, 3), (8, 5)), "15 jobs K=2 + 1 job K=9": ((15, 2), (1, 9))}


def padding_vs_grouping(repo, size: int, repeats: int = 8) -> list:
    """Median CPU ms of one step for mixes of attention-mode jobs (2 rows each): one call per K
    (what the scheduler does), or one call with every job padded to the largest K."""
    from serving.core.service import PipelineAssets
    from serving.models.onnx import LocalUnet, OnnxComponent

    info = PipelineAssets.read(Path(repo) / "pipeline" / "1").info
    unet = LocalUnet(OnnxComponent(Path(repo) / "unet_regional" / "1" / "model.onnx"))
    rng = np.random.default_rng(0)
    latent = size // int(info["vae_factor"])

    def inputs(rows, k):
        weights = rng.random((rows, k, latent, latent), dtype=np.float32)
        return (
            rng.standard_normal((rows, int(info["latent_channels"]), latent, latent), dtype=np.float32),
            np.full(rows, 500, np.float32),
            rng.standard_normal((rows, k, int(info["text_length"]), _hidden(unet)), dtype=np.float32),
            weights / weights.sum(axis=1, keepdims=True),
        )

    def cpu_ms(calls):
        start = time.process_time()
        for sample, t, context, weights in calls:
            unet(sample, t, context, region_weights=weights)
        return 1000 * (time.process_time() - start)

    out = []
    for name, groups in PADDING_MIXES.items():
        grouped = [inputs(2 * jobs, k) for jobs, k in groups]
        padded = [inputs(2 * sum(jobs for jobs, _ in groups), max(k for _, k in groups))]
        cpu_ms(grouped + padded)  # warm-up
        times = {"grouped": [], "padded": []}
        for _ in range(repeats):  # taking turns
            times["grouped"].append(cpu_ms(grouped))
            times["padded"].append(cpu_ms(padded))
        out.append({"mix": name, **{f"{k}_cpu_ms": round(float(np.median(v)), 1) for k, v in times.items()}})
    return out


def server_cpu_seconds(server) -> float:
    """User + system CPU seconds of tritonserver and its python-backend stubs so far."""
    import psutil

    root = psutil.Process(server.process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root] + root.children(recursive=True))


def _hidden(unet) -> int:
    return unet.component.session.get_inputs()[2].shape[-1]


class _Sink:
    error = None

    def progress(self, *args):
        pass

    def finish(self, image, seed):
        pass

    def fail(self, code, message):
        self.error = (code, message)

    def cancelled(self):
        return False


def run_regional(args, checkpoint, out: Path) -> int:
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.bench.loadgen import closed_loop
    from serving.triton.server import TritonServer

    repo = out / "repo-batched"
    write_repository(
        checkpoint,
        repo,
        pipeline_parameters=pipeline_parameters(
            unet=args.unet, max_active=args.max_active, max_rows=2 * args.max_active, max_queue=256
        ),
        log=lambda *a: None,
    )
    size = args.size or int(json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())["native_size"])
    report = {"checkpoint": str(checkpoint), "steps": args.steps, "guidance": args.guidance, "size": size}
    print(f"bench --regional: {checkpoint}, {size}x{size}, {args.steps} steps, guidance {args.guidance}", flush=True)

    report["step_costs"] = step_costs(repo, args.steps, args.guidance, size)
    plain_cpu = report["step_costs"][0]["cpu_ms_per_step"]
    print(
        "\n| one job | regions | UNet rows per step | CPU ms per step | vs plain | wall ms per step (fastest) |"
        "\n|---|---|---|---|---|---|"
    )
    for r in report["step_costs"]:
        print(
            f"| {r['kind']} | {r['regions'] or '-'} | {r['rows']} | {r['cpu_ms_per_step']} | "
            f"{r['cpu_ms_per_step'] / plain_cpu:.2f}x | {r['ms_per_step']} |"
        )
    report["padding"] = padding_vs_grouping(repo, size)
    print(
        "\n| attention-mode jobs in one step | grouped by K: CPU ms | padded to the largest K: CPU ms |\n|---|---|---|"
    )
    for p in report["padding"]:
        print(
            f"| {p['mix']} | {p['grouped_cpu_ms']} | {p['padded_cpu_ms']} ({p['padded_cpu_ms'] / p['grouped_cpu_ms']:.2f}x) |",
            flush=True,
        )

    common = dict(steps=args.steps, guidance_scale=args.guidance, height=size, width=size)
    plain = [dict(common, prompt=PROMPTS[i % len(PROMPTS)]) for i in range(4)]
    mixes = {"all plain": plain}
    for mode in ("latent", "attention"):
        mixes[f"25% regional ({mode}, R=2)"] = plain[:3] + [dict(common, **REGION_FIELDS, region_mode=mode)]
    # the mixes take turns for several rounds and each reports its median round, so that a
    # change in the shared machine's load falls on every mix alike
    rounds = {name: [] for name in mixes}
    with TritonServer(repo, log_file=out / "tritonserver-regional.log") as server:
        closed_loop(server.grpc_url, list(mixes.values())[1] + list(mixes.values())[2], 4, 8)  # warm-up: every kind
        for k in range(args.regional_rounds):
            for name, fields in mixes.items():
                cpu = server_cpu_seconds(server)
                result = closed_loop(server.grpc_url, fields, 16, args.requests, seed0=100 * k).summary()
                result["server_cpu_s_per_image"] = (server_cpu_seconds(server) - cpu) / max(1, result["completed"])
                rounds[name].append(result)
                print(
                    f"  round {k + 1}, {name}, C=16: {result['throughput_images_per_s']:.2f} img/s, "
                    f"p50 {result['latency_p50_s']:.3f} s",
                    flush=True,
                )
    runs = [
        {
            "mix": name,
            "rounds": results,
            **sorted(results, key=lambda r: r["throughput_images_per_s"])[len(results) // 2],
        }
        for name, results in rounds.items()
    ]
    report["runs"] = runs
    base = runs[0]["throughput_images_per_s"]
    base_cpu = float(np.median([r["server_cpu_s_per_image"] for r in rounds["all plain"]]))
    print(
        f"\n| C=16, one server (median of {args.regional_rounds} rounds) | throughput | vs all plain | "
        "server CPU s per image (median) | vs all plain | latency p50 / p99 | errors |\n|---|---|---|---|---|---|---|"
    )
    for r in runs:
        cpu = float(np.median([x["server_cpu_s_per_image"] for x in r["rounds"]]))
        r["server_cpu_s_per_image_median"] = cpu
        print(
            f"| {r['mix']} | {r['throughput_images_per_s']:.2f} img/s | {r['throughput_images_per_s'] / base:.2f}x | "
            f"{cpu:.3f} | {cpu / base_cpu:.2f}x | {r['latency_p50_s']:.3f} / {r['latency_p99_s']:.3f} s | {r['errors'] or 0} |"
        )
    (out / "regional.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'regional.json'}")
    return 0


if TYPE_CHECKING:  # mypy checks the implementations against the core's Protocols (serving/core/interfaces.py)
    from serving.core.interfaces import ResultSink

    _checked: type[ResultSink] = _Sink
