"""Images from a diffusers pipeline in process, the way the eval and the sample grids need them:
a list of prompts, one seed per image, uint8 output."""

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline


def load_pipeline(path) -> StableDiffusionPipeline:
    """The checkpoint on CPU, with its DDIM scheduler; all fp32 (the UNet ships fp16 weights)."""
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    assert all(m.dtype == torch.float32 for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def pipeline_images(
    pipe, prompts, seeds, guidance_scale: float, steps: int = 25, batch_size: int = 32, size: int = 64
) -> np.ndarray:
    """uint8 [N, size, size, 3]; image i depends only on (prompts[i], seeds[i]), not its batch."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(range(i, min(i + batch_size, len(prompts))))
        images = pipe(
            [prompts[j] for j in chunk],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(int(seeds[j])) for j in chunk],
            output_type="np",
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)
