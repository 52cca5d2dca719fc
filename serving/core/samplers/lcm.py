"""Latent consistency models' multistep sampling (Luo et al. 2023), as diffusers' LCMScheduler:
timesteps picked from the `original_inference_steps` skipping schedule, each step predicts the
clean latents through the consistency boundary condition and re-noises them to the next timestep
with fresh noise from the job's seed stream (none after the last). Needs an LCM-distilled UNet or
LCM-LoRA to give good images; the UNet's optional guidance embedding (timestep_cond) is not part
of the served contract."""

from typing import Any
import numpy as np

from serving.core.interfaces import Array
from serving.core.sampler import train_alphas_cumprod
from serving.core.samplers.base import Sampler, per_row, SamplerRun

SIGMA_DATA = 0.5


class LCM(Sampler):
    name = "lcm"

    def __init__(self, config: dict[str, Any], sigma_schedule: str = "default"):
        super().__init__(config, sigma_schedule)
        self.alphas_cumprod = train_alphas_cumprod(config).astype(np.float32)
        self.original_steps = int(config.get("original_inference_steps", 50))
        self.timestep_scaling = float(config.get("timestep_scaling", 10.0))
        self.clip_sample_range = (
            float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", False) else None
        )

    def _make_schedule(self, steps: int, mu: float | None = None) -> tuple[Any, ...]:
        k = self.num_train_timesteps // self.original_steps
        origin = (np.arange(1, self.original_steps + 1) * k - 1)[::-1]
        indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
        timesteps = origin[indices]
        return timesteps.astype(np.float64), timesteps.astype(np.int64)

    def draws_noise(self, run: SamplerRun, position: int) -> bool:
        return position != run.steps - 1

    def add_noise(self, run: SamplerRun, clean: Array, noise: Array, position: int) -> Array:
        if position >= run.steps:
            return clean
        alpha = np.float64(self.alphas_cumprod[run.values[position]])
        return (np.float32(alpha**0.5) * clean + np.float32((1 - alpha) ** 0.5) * noise).astype(np.float32)

    def step(
        self, runs: list[Any], positions: list[Any], model_output: Array, latents: Array, noise: Array | None
    ) -> tuple[Any, ...]:
        t = np.array([r.values[p] for r, p in zip(runs, positions)])
        t_prev = np.array([r.values[p + 1] if p + 1 < r.steps else r.values[p] for r, p in zip(runs, positions)])
        alpha_t = self.alphas_cumprod[t].astype(np.float64)
        alpha_prev = self.alphas_cumprod[t_prev].astype(np.float64)
        scaled = t * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        if self.prediction_type == "epsilon":
            x0 = (latents - per_row(np.sqrt(1 - alpha_t)) * model_output) / per_row(np.sqrt(alpha_t))
        elif self.prediction_type == "v_prediction":
            x0 = per_row(np.sqrt(alpha_t)) * latents - per_row(np.sqrt(1 - alpha_t)) * model_output
        else:
            x0 = model_output.astype(np.float32)
        if self.clip_sample_range is not None:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        denoised = (per_row(c_out) * x0 + per_row(c_skip) * latents).astype(np.float32)
        last = np.array([p == r.steps - 1 for r, p in zip(runs, positions)])
        prev = denoised.copy()
        if not last.all():
            renoised = per_row(np.sqrt(alpha_prev)) * denoised + per_row(np.sqrt(1 - alpha_prev)) * noise
            prev[~last] = renoised[~last]
        return prev.astype(np.float32), denoised
