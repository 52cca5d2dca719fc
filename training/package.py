"""The shipped checkpoint: the trained pipeline with the UNet's safetensors in fp16 (it is 85% of
the bytes; fp32 everywhere would exceed the 30 MB budget), accepted only if images generated from
it match the fp32 weights. The text encoder and VAE stay fp32: transformers keeps a checkpoint's
dtype on load, and a plain `from_pretrained` must give an all-fp32 pipeline on CPU (diffusers
upcasts the UNet itself)."""

import shutil
from pathlib import Path

import numpy as np
import torch

from training.generate import load_pipeline, pipeline_images
from training.train import grid_prompts

MAX_MEAN_ABS_DIFF = 1.0  # mean |fp16 - fp32| per uint8 pixel value over the parity images
MAX_BYTES = 30 * 2**20


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def package_checkpoint(source: Path, out: Path) -> str:
    prompts = [p for p, _ in grid_prompts()]
    pipe = load_pipeline(source)
    reference = pipeline_images(pipe, prompts, range(len(prompts)), guidance_scale=5.0)
    if out.exists():
        shutil.rmtree(out)
    pipe.unet.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    shipped = pipeline_images(load_pipeline(out), prompts, range(len(prompts)), guidance_scale=5.0)
    diff = float(np.abs(shipped.astype(np.float64) - reference).mean())
    size = folder_bytes(out)
    if diff > MAX_MEAN_ABS_DIFF or size > MAX_BYTES:
        raise RuntimeError(f"fp16 checkpoint rejected: mean abs diff {diff:.3f}, {size / 2**20:.1f} MiB")
    return f"{size / 2**20:.1f} MiB fp16, mean |fp16 - fp32| {diff:.3f} / 255 over {len(prompts)} images"
