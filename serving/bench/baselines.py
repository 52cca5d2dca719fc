"""The in-process baselines the benchmark compares the server against.

(a) diffusers' StableDiffusionPipeline answering one request at a time: what a user would run
    instead of a server. (c) the bare ONNX Runtime loop at batch 1: text encoder, DDIM loop with
    one UNet call per step, VAE decoder, no server, no scheduler: the floor of overhead."""
import time

import numpy as np

from serving.models.onnx import LocalModels
from serving.core.runner import to_uint8
from serving.core.sampler import DDIMSchedule, guided_noise, noise_generator
from serving.core.service import PipelineAssets
from serving.core.text import PromptTokenizer


def diffusers_latencies(checkpoint, prompts, steps, guidance, size) -> list:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latencies = []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
             generator=torch.Generator().manual_seed(i), output_type="np")
        latencies.append(time.perf_counter() - start)
    return latencies


class BareOnnxLoop:
    def __init__(self, repo):
        assets = PipelineAssets.read(repo / "pipeline" / "1")
        self.info = assets.info
        self.models = LocalModels(repo)
        self.schedule = DDIMSchedule.from_config(assets.scheduler_config)
        self.tokenizer = PromptTokenizer(assets.tokenizer_dir, int(assets.info["text_length"]))

    def generate(self, prompt, seed, steps, guidance, size) -> np.ndarray:
        context = self.models.encode_text(self.tokenizer.encode([prompt, ""]))["last_hidden_state"]
        latent = size // int(self.info["vae_factor"])
        x = noise_generator(seed).standard_normal((1, int(self.info["latent_channels"]), latent, latent), dtype=np.float32)
        timesteps = self.schedule.timesteps(steps)
        for t in timesteps:
            rows = np.array([t, t])
            eps_cond, eps_uncond = self.models.unet(np.concatenate([x, x]), rows, context)
            eps = guided_noise(eps_uncond[None], eps_cond[None], np.array([guidance]))
            t1 = np.array([t])
            x, _ = self.schedule.step(eps, t1, self.schedule.previous_timesteps(t1, np.array([steps])), x, np.zeros(1))
        return to_uint8(self.models.decode(x)[0])

    def latencies(self, prompts, steps, guidance, size) -> list:
        out = []
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            self.generate(prompt, i, steps, guidance, size)
            out.append(time.perf_counter() - start)
        return out
