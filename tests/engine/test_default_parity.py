"""The default model (checkpoints/ldm-shapes), exported and run by the pipeline's engine in
this process (ONNX Runtime), matches diffusers' StableDiffusionPipeline given the same initial
latents: DDIM, eta 0, 25 steps, its zero-terminal-SNR v-prediction schedule. The tiny random
checkpoint's parity (tests/server/test_server.py) is loose; on the trained weights the match is
within 0.01/255 mean absolute difference."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from serving.core.sampler import noise_generator
from tests.support.image_inputs import generate, service

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "ldm-shapes"
PROMPT = "a large red circle on the left of a black background"
MAX_MEAN_ABS = 0.01 / 255


@pytest.fixture(scope="module")
def default_service(default_repo):
    return service(default_repo)


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionPipeline.from_pretrained(CHECKPOINT, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 5.0, 7.5])
def test_default_model_served_in_process_matches_diffusers(default_service, pipe, guidance):
    seed, size = 31, 64
    served = generate(
        default_service, PROMPT, seed=seed, steps=25, guidance_scale=guidance, eta=0.0, height=size, width=size
    )
    shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    latents = noise_generator(seed).standard_normal(shape, dtype=np.float32)[None]
    reference = pipe(
        PROMPT,
        num_inference_steps=25,
        guidance_scale=guidance,
        height=size,
        width=size,
        eta=0.0,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images[0]
    reference = (reference * 255).round().astype(np.uint8)
    difference = np.abs(served.astype(int) - reference.astype(int))
    print(f"guidance {guidance}: mean abs difference {difference.mean():.5f}/255, max {difference.max()}")
    assert difference.mean() / 255 <= MAX_MEAN_ABS
    assert served.std() > 1.0  # a picture, not a blank that would match any blank
