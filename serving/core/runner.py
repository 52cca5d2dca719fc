"""Running the models for the jobs the scheduler picked: text encoding on admission, one UNet
call per iteration for all chosen rows, the DDIM update per row, VAE decoding of finished jobs.

`models` is anything with encode_text(input_ids), unet(sample, timestep, encoder_hidden_states)
and decode(latents) over numpy arrays: Triton BLS calls, or ONNX Runtime in this process.
"""
from collections import defaultdict

import numpy as np

from serving.core.sampler import DDIMSchedule, guided_noise, noise_generator
from serving.core.text import PromptTokenizer


class Runner:
    def __init__(self, models, schedule: DDIMSchedule, tokenizer: PromptTokenizer, latent_channels: int, vae_factor: int):
        self.models = models
        self.schedule = schedule
        self.tokenizer = tokenizer
        self.latent_channels = latent_channels
        self.vae_factor = vae_factor

    def admit(self, jobs: list) -> None:
        """Text-encodes the new jobs in one call and draws their starting latents."""
        texts = [j.request.prompt for j in jobs] + [j.request.negative_prompt for j in jobs if j.request.uses_guidance]
        embeddings = self.models.encode_text(self.tokenizer.encode(texts))
        negatives = iter(embeddings[len(jobs):])
        for job, cond in zip(jobs, embeddings[: len(jobs)]):
            r = job.request
            job.cond = cond
            job.uncond = next(negatives) if r.uses_guidance else None
            job.rng = noise_generator(r.seed)
            shape = (self.latent_channels, r.height // self.vae_factor, r.width // self.vae_factor)
            job.latents = job.rng.standard_normal(shape, dtype=np.float32)
            job.timesteps = self.schedule.timesteps(r.steps)

    def step(self, jobs: list) -> None:
        """One denoising step for every job in `jobs` (same latent size) with one UNet call."""
        t = np.array([j.timesteps[j.index] for j in jobs], dtype=np.int64)
        latents = np.stack([j.latents for j in jobs])
        guided = [i for i, j in enumerate(jobs) if j.request.uses_guidance]
        # rows: every job's conditional row, then an unconditional row per guided job
        sample = np.concatenate([latents, latents[guided]])
        timestep = np.concatenate([t, t[guided]])
        context = np.stack([j.cond for j in jobs] + [jobs[i].uncond for i in guided])
        eps_rows = self.models.unet(sample, timestep, context)
        eps = eps_rows[: len(jobs)].copy()
        if guided:
            scale = np.array([jobs[i].request.guidance_scale for i in guided])
            eps[guided] = guided_noise(eps_rows[len(jobs):], eps[guided], scale)
        steps = np.array([j.request.steps for j in jobs])
        eta = np.array([j.request.eta for j in jobs])
        noise = None
        if np.any(eta > 0):
            noise = np.stack(
                [
                    j.rng.standard_normal(j.latent_shape, dtype=np.float32) if j.request.eta > 0 else np.zeros(j.latent_shape, np.float32)
                    for j in jobs
                ]
            )
        prev, x0 = self.schedule.step(eps, t, self.schedule.previous_timesteps(t, steps), latents, eta, noise)
        for i, job in enumerate(jobs):
            job.latents = prev[i]
            job.pred_x0 = x0[i]
            job.index += 1

    def decode(self, jobs: list) -> list:
        """uint8 [H, W, 3] images of finished jobs, one VAE call per latent size."""
        images = [None] * len(jobs)
        by_shape = defaultdict(list)
        for i, job in enumerate(jobs):
            by_shape[job.latent_shape].append(i)
        for indices in by_shape.values():
            pixels = self.models.decode(np.stack([jobs[i].latents for i in indices]))
            for i, image in zip(indices, pixels):
                images[i] = to_uint8(image)
        return images


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats to bytes, rounding as diffusers' numpy_to_pil does."""
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
