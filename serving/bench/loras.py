"""`ldm bench --loras`: what mixing LoRA adapters in one denoiser call costs and saves, in this
process (the pipeline's engine and ONNX Runtime runner, no Triton: the same code the pipeline
model runs).

Three closed loops of the same requests at concurrency C (default 16), one after the other:
- plain: a repository exported without LoRA inputs, requests without adapters;
- mixed: exported with --lora-dir, the requests spread over `adapters` distinct adapters (and
  none), rows of every adapter set in one call (what this server does);
- per_set: the same repository and requests with `lora_batching=per_set`: a call holds one
  adapter set, what a server that cannot mix adapters must do.
Then the per-call overhead of the LoRA graph against the plain UNet at a fixed number of rows,
over adapter ranks and the number of adapters the call's rows use (the call's bank width is their
product; adapters resident but unused by the call cost nothing).

The adapters are random LoRAs of the checkpoint (diffusers' own saver, PEFT layers on the
attention projections): their weights do not change the cost, only their rank and number do.
"""

from concurrent.futures import ThreadPoolExecutor
import json
from pathlib import Path
import shutil
import time
from typing import Any

import numpy as np

PROMPTS = (
    "a large red circle on the left",
    "a small blue square at the top",
    "a green triangle to the left of a red square",
)


def random_lora(checkpoint, folder: Path, seed: int, rank: int) -> Path:
    """A LoRA of `checkpoint`'s UNet with random weights, saved by diffusers in its own format."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers,
        weight_name=f"lora{seed}.safetensors",
        unet_lora_adapter_metadata={"r": rank, "lora_alpha": rank, "target_modules": targets},
    )
    return folder / f"lora{seed}.safetensors"


def closed_loop(service, requests: list, concurrency: int) -> float:
    """Images per second of `requests` (field dicts) sent by `concurrency` clients."""
    from serving.bench.inprocess import EngineClient

    client = EngineClient(service)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda fields: client.generate(fields.pop("prompt"), **fields), [dict(r) for r in requests]))
    return len(requests) / (time.perf_counter() - started)


def in_process(repo: Path, params: dict):
    """The repository's pipeline service in this process: ONNX Runtime for every component."""
    from serving.core.config import PipelineConfig
    from serving.core.service import PipelineAssets, PipelineService
    from serving.models.adapters import read_adapter
    from serving.models.onnx import local_variants

    config = PipelineConfig.parse({k: str(v) for k, v in params.items()})
    return PipelineService(
        PipelineAssets.read(repo / "pipeline" / "1"), config, local_variants(repo), lora_reader=read_adapter
    ).start()


def run_loras(
    checkpoint,
    out: Path,
    requests: int = 48,
    concurrency: int = 16,
    adapters: int = 4,
    rank: int = 16,
    steps: int = 10,
    rounds: int = 3,
    sweep_ranks=(4, 16, 64),
    sweep_counts=(1, 4, 8),
    log=print,
) -> dict:
    from export.cli import pipeline_parameters
    from export.repository import write_repository

    out.mkdir(parents=True, exist_ok=True)
    folder = out / "loras"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    files = [random_lora(checkpoint, folder, seed, rank) for seed in range(adapters)]
    names = [f.stem for f in files]
    load = []
    for i in range(requests):
        fields = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps, "guidance_scale": 5.0}
        load.append(fields)
    with_adapters = [
        dict(f, lora_names=np.array([names[i % (adapters + 1) - 1].encode()], object))
        if i % (adapters + 1)
        else dict(f)
        for i, f in enumerate(load)
    ]  # every adapter, and none
    results: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "requests": requests,
        "concurrency": concurrency,
        "adapters": adapters,
        "rank": rank,
        "steps": steps,
        "rounds": rounds,
    }
    loads = {
        "plain": (pipeline_parameters(), load),
        "mixed": (pipeline_parameters(lora_dir=str(folder)), with_adapters),
        "per_set": ({**pipeline_parameters(lora_dir=str(folder)), "lora_batching": "per_set"}, with_adapters),
    }
    services = {}
    try:
        for label, (params, batch) in loads.items():
            repo = out / f"repo-{'plain' if label == 'plain' else 'lora'}"
            write_repository(checkpoint, repo, pipeline_parameters=params, log=lambda *a: None)
            services[label] = in_process(repo, params)
            closed_loop(services[label], batch[:concurrency], concurrency)  # warm-up: sessions, adapters resident
        rates = {label: [] for label in loads}
        rows = {label: [0, 0] for label in loads}
        for _ in range(rounds):  # interleaved, so a noisy moment of a shared machine hits every mode alike
            for label, (_, batch) in loads.items():
                stats = services[label].engine.stats
                before = (stats.rows, stats.steps)
                rates[label].append(closed_loop(services[label], batch, concurrency))
                rows[label][0] += stats.rows - before[0]
                rows[label][1] += stats.steps - before[1]
    finally:
        for service in services.values():
            service.stop()
    for label in loads:
        results[label] = {
            "images_per_s": round(float(np.median(rates[label])), 3),
            "rows_per_call": round(rows[label][0] / max(1, rows[label][1]), 2),
        }
        log(
            f"{label}: {results[label]['images_per_s']} img/s (median of {rounds}), {results[label]['rows_per_call']} rows per UNet call"
        )
    results["mixed_vs_plain"] = round(results["mixed"]["images_per_s"] / results["plain"]["images_per_s"], 3)
    results["mixed_vs_per_set"] = round(results["mixed"]["images_per_s"] / results["per_set"]["images_per_s"], 3)
    results["overhead"] = call_overhead(out / "repo-plain", out / "repo-lora", sweep_ranks, sweep_counts)
    (out / "loras.json").write_text(json.dumps(results, indent=1))
    return results


def call_overhead(plain_repo: Path, lora_repo: Path, ranks, counts, rows: int = 16, rounds: int = 5) -> list:
    """Median seconds of one UNet call at `rows` rows with the LoRA graph (every row with an
    adapter; bank width rank x count) over the plain graph's, per (rank, count)."""
    from serving.models.onnx import OnnxComponent

    plain_info = json.loads((plain_repo / "pipeline" / "1" / "pipeline.json").read_text())
    facts = json.loads((lora_repo / "pipeline" / "1" / "pipeline.json").read_text())
    facts = facts["variants"][facts["primary"]]
    plain = OnnxComponent(plain_repo / "unet" / "1" / "model.onnx")
    lora = OnnxComponent(lora_repo / "pipeline" / "1" / facts["lora_unet"])
    side = plain_info["native_size"] // plain_info["vae_factor"]
    rng = np.random.default_rng(0)
    base = {
        "sample": rng.standard_normal((rows, plain_info["latent_channels"], side, side), dtype=np.float32),
        "timestep": np.full(rows, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (rows, plain_info["text_length"], plain.session.get_inputs()[2].shape[2]), dtype=np.float32
        ),
    }

    def median(component, inputs):
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            component(**inputs)
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    plain_s = median(plain, base)
    out = []
    for rank in ranks:
        for count in counts:
            width = rank * count
            inputs = dict(base, lora_scales=np.ones((rows, width), np.float32))
            for layer, (fan_in, fan_out) in facts["lora_unet_layers"].items():
                inputs[f"lora_A.{layer}"] = (0.01 * rng.standard_normal((fan_in, width))).astype(np.float32)
                inputs[f"lora_B.{layer}"] = (0.01 * rng.standard_normal((width, fan_out))).astype(np.float32)
            seconds = median(lora, inputs)
            out.append(
                {
                    "rank": rank,
                    "adapters": count,
                    "columns": width,
                    "plain_s": round(plain_s, 5),
                    "lora_s": round(seconds, 5),
                    "overhead": round(seconds / plain_s - 1, 3),
                }
            )
    return out


def table(results: dict) -> str:
    lines = [
        f"LoRA mixing, {results['requests']} requests at C={results['concurrency']}, {results['adapters']} adapters "
        f"of rank {results['rank']} spread over them (and none), {results['steps']} steps, median of {results['rounds']} "
        f"interleaved rounds:",
        f"  plain (no LoRA inputs, no adapters): {results['plain']['images_per_s']} img/s, {results['plain']['rows_per_call']} rows/call",
        f"  mixed adapters in one call:          {results['mixed']['images_per_s']} img/s, {results['mixed']['rows_per_call']} rows/call"
        f"  -> {results['mixed_vs_plain']}x plain (target >= 0.8)",
        f"  one adapter set per call (baseline): {results['per_set']['images_per_s']} img/s, {results['per_set']['rows_per_call']} rows/call"
        f"  -> mixed is {results['mixed_vs_per_set']}x (target >= 2)",
        "  UNet call with the LoRA graph vs plain, 16 rows with adapters: rank x adapters in the call = columns: overhead",
    ]
    lines += [
        f"    {o['rank']:>3} x {o['adapters']} = {o['columns']:>4}: {o['lora_s'] * 1000:.1f} ms vs {o['plain_s'] * 1000:.1f} ms "
        f"({o['overhead']:+.1%})"
        for o in results["overhead"]
    ]
    return "\n".join(lines)
