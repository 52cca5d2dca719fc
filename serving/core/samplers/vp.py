"""What DPM-Solver++ and UniPC share: integer timesteps spaced as diffusers'
DPMSolverMultistepScheduler and UniPCMultistepScheduler space them, sigmas interpolated at them
(or Karras sigmas, their timesteps rounded), a final sigma of 0; latents stay at unit scale and
the update runs in the variance-preserving (alpha_t, sigma_t) and log-SNR lambda terms."""

from typing import Any
import numpy as np

from serving.core.interfaces import Array
from serving.core.samplers.base import (
    TrainSigmaSampler,
    karras_sigmas,
    sigma_to_t,
    vp_alpha_sigma,
    x0_from_vp,
    SamplerRun,
)


class VPSolver(TrainSigmaSampler):
    def _make_schedule(self, steps: int, mu: float | None = None) -> tuple[Any, ...]:
        n = self.num_train_timesteps
        if self.spacing == "linspace":
            timesteps = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif self.spacing == "leading":
            ratio = n // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            timesteps += int(self.config.get("steps_offset", 0))
        else:  # trailing
            timesteps = np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
        train = self.train_sigmas.astype(np.float64)
        if self.sigma_schedule == "karras":
            sigmas = karras_sigmas(train[0], train[-1], steps)
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas)).round()
        else:
            sigmas = np.interp(timesteps, np.arange(n), train)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return timesteps.astype(np.int64).astype(np.float64), sigmas

    def add_noise(self, run: SamplerRun, clean: Array, noise: Array, position: int) -> Array:
        if position >= run.steps:
            return clean
        alpha, sigma = vp_alpha_sigma(np.float32(run.values[position]))
        return (np.float32(alpha) * clean + np.float32(sigma) * noise).astype(np.float32)

    def lam(self, run: SamplerRun, position: int) -> tuple[Any, ...]:
        """(alpha_t, sigma_t, lambda_t) at a position (lambda = +inf at the final sigma 0)."""
        alpha, sigma = vp_alpha_sigma(run.values[position])
        with np.errstate(divide="ignore"):
            return alpha, sigma, np.log(alpha) - np.log(sigma)

    def convert(self, runs: list[Any], positions: list[Any], model_output: Array, latents: Array) -> Array:
        """The data prediction x_0 of every row (the solvers' model output)."""
        alphas, sigmas = zip(*(vp_alpha_sigma(r.values[p]) for r, p in zip(runs, positions)))
        return x0_from_vp(self.prediction_type, model_output, latents, np.array(alphas), np.array(sigmas)).astype(
            np.float32
        )
