"""Quality per step, through the service: for each sampler setting, the held-out whole-prompt
adherence at guidance 5 and the images/s of the same run (the held-out prompts sent by 16
concurrent clients). `ldm eval --sampler-table` starts a server on the default model and prints
the table of SETTINGS (docs/samplers.md holds the last one); `ldm eval --sampler S
--steps N [--sigma-schedule K] [--guidance-interval LO HI]` measures one setting.

The target (issue on samplers): some setting reaches DDIM-25's held-out adherence within 2
points at >= 1.6x its images/s. Ratios come from one run: the machines are shared and noisy."""

from concurrent.futures import ThreadPoolExecutor
import json
from pathlib import Path
import tempfile
import threading
import time

import numpy as np

from training.data import eval_scenes
from training.evaluate import score

GUIDANCE = 5.0
INTERVAL = (0.0, 0.8)  # the guidance interval tried beside every setting (no guidance in the last 20%)
SETTINGS = [  # (sampler, sigma schedule, steps)
    ("ddim", "default", 25),
    ("ddim", "default", 15),
    ("ddim", "default", 10),
    ("euler", "default", 25),
    ("euler", "default", 15),
    ("dpmpp_2m", "default", 25),
    ("dpmpp_2m", "default", 15),
    ("dpmpp_2m", "default", 10),
    ("dpmpp_2m", "karras", 25),
    ("dpmpp_2m", "karras", 15),
    ("dpmpp_2m", "karras", 10),
    ("unipc", "default", 10),
    ("unipc", "default", 15),
    ("euler_ancestral", "default", 25),
]
ADHERENCE_SLACK = 0.02
SPEEDUP_TARGET = 1.6


def measure(
    url: str,
    sampler: str,
    schedule: str,
    steps: int,
    interval=(0.0, 1.0),
    prompts: int = 100,
    concurrency: int = 16,
    metrics_url: str | None = None,
) -> dict:
    """Held-out whole-prompt accuracy at guidance 5 (seed i for prompt i) and images/s of the run;
    with `metrics_url`, the UNet rows per image (guidance intervals leave unconditional rows out)."""
    from serving.client.kserve import LdmClient

    scenes = eval_scenes(prompts, held_out=True)
    local = threading.local()

    def one(i):
        if not hasattr(local, "client"):
            local.client = LdmClient(url)
        return local.client.generate(
            scenes[i].caption,
            seed=i,
            steps=steps,
            guidance_scale=GUIDANCE,
            height=64,
            width=64,
            sampler=sampler,
            sigma_schedule=schedule,
            guidance_interval=np.array(interval, np.float32),
        )

    before = settled_counters(metrics_url) if metrics_url else None
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        images = list(pool.map(one, range(prompts)))
    seconds = time.perf_counter() - started
    result = score(scenes, np.stack(images))
    row = {
        "sampler": sampler,
        "sigma_schedule": schedule,
        "steps": steps,
        "guidance_interval": list(interval),
        "prompt_accuracy": result["prompt_accuracy"],
        "images_per_s": prompts / seconds,
        "prompts": prompts,
    }
    if metrics_url:
        assert before is not None
        after = settled_counters(metrics_url)
        row["unet_rows_per_image"] = (after["ldm_unet_rows_total"] - before["ldm_unet_rows_total"]) / prompts
        row["rows_saved_per_image"] = (
            after["ldm_unet_rows_saved_total"] - before["ldm_unet_rows_saved_total"]
        ) / prompts
    return row


def settled_counters(metrics_url: str, period_s: float = 0.6, limit_s: float = 30.0) -> dict:
    """The engine's counters once they stop changing over one export period (0.5 s)."""
    from serving.bench.soak import counters

    deadline = time.monotonic() + limit_s
    last = counters(metrics_url)
    while time.monotonic() < deadline:
        time.sleep(period_s)
        now = counters(metrics_url)
        if now == last:
            return now
        last = now
    raise RuntimeError(f"the server's counters at {metrics_url} kept changing for {limit_s} s")


def sampler_table(checkpoint: Path, prompts: int, out: Path | None) -> int:
    """Starts a server on `checkpoint`, measures every setting with and without INTERVAL, prints
    the table and whether the target is met; writes the rows as JSON to `out`."""
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.triton.server import TritonServer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "model_repository"
        write_repository(checkpoint, repo, pipeline_parameters=pipeline_parameters(max_queue=256), log=lambda *a: None)
        with TritonServer(repo, log_file=Path(tmp) / "tritonserver.log") as server:
            measure(server.grpc_url, "ddim", "default", 5, prompts=16)  # warm-up: sessions, caches
            for sampler, schedule, steps in SETTINGS:
                for interval in ((0.0, 1.0), INTERVAL):
                    row = measure(
                        server.grpc_url, sampler, schedule, steps, interval, prompts, metrics_url=server.metrics_url
                    )
                    rows.append(row)
                    print(_line(row, rows[0]), flush=True)
    if out is not None:
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "prompts": prompts, "rows": rows}, indent=1))
    return report(rows)


def _name(row) -> str:
    interval = "" if row["guidance_interval"] == [0.0, 1.0] else f", interval {row['guidance_interval']}"
    schedule = "" if row["sigma_schedule"] in ("default", None) else f" {row['sigma_schedule']}"
    return f"{row['sampler']}{schedule} {row['steps']}{interval}"


def _line(row, base) -> str:
    rows = f" {row['unet_rows_per_image']:.1f} |" if "unet_rows_per_image" in row else ""
    return (
        f"| {_name(row)} | {row['prompt_accuracy']:.1%} | {row['images_per_s']:.2f} | "
        f"{row['images_per_s'] / base['images_per_s']:.2f}x |{rows}"
    )


def report(rows: list, target: bool = True) -> int:
    base = rows[0]
    column = " UNet rows per image |" if "unet_rows_per_image" in base else ""
    print(
        f"\n| setting | held-out whole-prompt (g=5) | images/s (C=16) | vs ddim 25 |{column}\n"
        f"|---|---|---|---|{'---|' if column else ''}"
    )
    for row in rows:
        print(_line(row, base))
    if not target:
        return 0
    good = [r for r in rows if r["prompt_accuracy"] >= base["prompt_accuracy"] - ADHERENCE_SLACK]
    best = max(good, key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / base["images_per_s"]
    print(
        f"\nfastest setting within {ADHERENCE_SLACK:.0%} of ddim 25's adherence ({base['prompt_accuracy']:.1%}): "
        f"{_name(best)}, {best['prompt_accuracy']:.1%} at {ratio:.2f}x ddim 25's images/s "
        f"(target >= {SPEEDUP_TARGET}x): {'PASS' if ratio >= SPEEDUP_TARGET else 'FAIL'}"
    )
    return 0
