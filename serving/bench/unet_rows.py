"""`ldm bench --unet-rows`: what one denoising step's UNet call costs at each batch size (rows),
in process with ONNX Runtime as the pipeline runs it: why throughput on CPU grows so little
with load (a step over 32 rows costs many times one over 2), unlike on a GPU. Every family's UNet
inputs are made from the exported model's own input list (SDXL: text_embeds and time_ids too).

Row counts take turns over the rounds, so the machine's load falls on all alike; reported per
row count: the median CPU milliseconds of one call (all threads) and the fastest wall time."""

import json
from pathlib import Path
import time

import numpy as np

ROWS = (2, 4, 8, 16, 32)


def unet_row_costs(repo, size: int, rows=ROWS, rounds: int = 7) -> list:
    from serving.core.service import PipelineAssets
    from serving.models.onnx import OnnxComponent

    info = PipelineAssets.read(Path(repo) / "pipeline" / "1").info
    unet = OnnxComponent(Path(repo) / "unet" / "1" / "model.onnx")
    latent = size // int(info["vae_factor"])
    rng = np.random.default_rng(0)

    def value(spec, n):
        """Row-count n of one UNet input (every family's: SDXL's text_embeds and time_ids too)."""
        shape = [n] + [d if isinstance(d, int) else latent for d in spec.shape[1:]]  # dynamic: latent height, width
        if spec.name == "timestep":
            return np.full(shape, 500, np.float32)
        if "int" in spec.type:
            return np.full(shape, 20, np.int64)  # the upscaler's noise level
        return rng.standard_normal(shape, dtype=np.float32)

    inputs = {n: {spec.name: value(spec, n) for spec in unet.session.get_inputs()} for n in rows}
    for n in rows:  # warm-up: first calls of a shape allocate
        unet(**inputs[n])
    cpu, wall = {n: [] for n in rows}, {n: [] for n in rows}
    for _ in range(rounds):
        for n in rows:
            started_cpu, started = time.process_time(), time.perf_counter()
            unet(**inputs[n])
            cpu[n].append(1000 * (time.process_time() - started_cpu))
            wall[n].append(1000 * (time.perf_counter() - started))
    base = float(np.median(cpu[rows[0]]))
    return [
        {
            "rows": n,
            "cpu_ms": round(float(np.median(cpu[n])), 1),
            "wall_ms_fastest": round(min(wall[n]), 1),
            "cpu_vs_first": round(float(np.median(cpu[n])) / base, 2),
        }
        for n in rows
    ]


def run_unet_rows(args, checkpoint, out: Path) -> int:
    import os

    from families.checkpoint import CheckpointInfo
    from export.cli import pipeline_parameters
    from export.repository import write_repository

    size = args.size or CheckpointInfo.read(checkpoint).native_size
    repo = out / "repo-batched"
    write_repository(checkpoint, repo, pipeline_parameters=pipeline_parameters(), log=lambda *a: None)
    costs = unet_row_costs(repo, size)
    print(
        f"UNet call cost by rows, in process (ONNX Runtime), {checkpoint.name} {size}x{size}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print("| rows | CPU ms per call (median) | vs 2 rows | wall ms (fastest) |\n|---|---|---|---|")
    for c in costs:
        print(f"| {c['rows']} | {c['cpu_ms']} | {c['cpu_vs_first']}x | {c['wall_ms_fastest']} |")
    report = {
        "checkpoint": str(checkpoint),
        "size": size,
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "costs": costs,
    }
    (out / "unet_rows.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'unet_rows.json'}")
    return 0
