"""Euler and Euler ancestral (Karras et al. 2022, k-diffusion's sample_euler and
sample_euler_ancestral) in sigma space, as diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler compute them: latents live at scale sqrt(sigma^2 + 1), the UNet
sees them divided by it, and its timestep is the sigma's (fractional, for Karras sigmas)."""

from typing import Any
import numpy as np

from serving.core.interfaces import Array
from serving.core.samplers.base import SamplerRun, TrainSigmaSampler, karras_sigmas, per_row, sigma_to_t


class Euler(TrainSigmaSampler):
    name = "euler"

    def _make_schedule(self, steps: int, mu: float | None = None) -> tuple[Any, ...]:
        n = self.num_train_timesteps
        if self.spacing == "linspace":
            timesteps = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        elif self.spacing == "leading":
            timesteps = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.float32)
            timesteps += int(self.config.get("steps_offset", 0))
        else:  # trailing
            timesteps = np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
        sigmas = np.interp(timesteps, np.arange(n), self.train_sigmas.astype(np.float64))
        if self.sigma_schedule == "karras":
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], steps)
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas))
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return timesteps.astype(np.float32).astype(np.float64), sigmas

    def initial_latents(self, run: SamplerRun, noise: Array) -> Array:
        sigma_max = np.float32(run.values.max())
        scale = sigma_max if self.spacing in ("linspace", "trailing") else np.float32((sigma_max**2 + 1) ** 0.5)
        return (noise * scale).astype(np.float32)

    def input_scale(self, run: SamplerRun, position: int) -> float:
        sigma = np.float32(run.values[position])
        return float(np.float32(1.0) / np.float32((sigma**2 + 1) ** 0.5))

    def add_noise(self, run: SamplerRun, clean: Array, noise: Array, position: int) -> Array:
        out: Array = (clean + noise * run.values[position]).astype(np.float32)
        return out

    def x0(self, model_output: Array, sample: Array, sigma: Any) -> Array:
        if self.prediction_type == "epsilon":
            out: Array = sample - per_row(sigma) * model_output
            return out
        if self.prediction_type == "v_prediction":
            s = np.asarray(sigma, np.float64)
            out = model_output * per_row(-s / (s**2 + 1) ** 0.5) + sample / per_row(s**2 + 1)
            return out
        return model_output.astype(np.float32)

    def step(
        self, runs: list[Any], positions: list[Any], model_output: Array, latents: Array, noise: Array | None
    ) -> tuple[Any, ...]:
        sigma = np.array([r.values[p] for r, p in zip(runs, positions)], np.float64)
        sigma_next = np.array([r.values[p + 1] for r, p in zip(runs, positions)], np.float64)
        x0 = self.x0(model_output, latents, sigma)
        derivative = (latents - x0) / per_row(sigma)
        return (latents + derivative * per_row(sigma_next - sigma)).astype(np.float32), x0.astype(np.float32)


class EulerAncestral(Euler):
    """Each step goes down to sigma_down and adds fresh noise of sigma_up, drawn from the job's
    seed stream."""

    name = "euler_ancestral"

    def draws_noise(self, run: SamplerRun, position: int) -> bool:
        return True

    def step(
        self, runs: list[Any], positions: list[Any], model_output: Array, latents: Array, noise: Array | None
    ) -> tuple[Any, ...]:
        sigma = np.array([r.values[p] for r, p in zip(runs, positions)], np.float64)
        sigma_to = np.array([r.values[p + 1] for r, p in zip(runs, positions)], np.float64)
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        x0 = self.x0(model_output, latents, sigma)
        derivative = (latents - x0) / per_row(sigma)
        prev = latents + derivative * per_row(sigma_down - sigma) + noise * per_row(sigma_up)
        return prev.astype(np.float32), x0.astype(np.float32)
