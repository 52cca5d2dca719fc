"""Flow-matching Euler (Lipman et al. 2023; diffusers' FlowMatchEulerDiscreteScheduler): the model
predicts the velocity v = noise - x_0 along x_sigma = (1 - sigma) x_0 + sigma noise, sigma goes
from sigma_max to 0, x <- x + (sigma_next - sigma) v. The timestep the model sees is sigma x
num_train_timesteps (fractional). Sigmas are shifted by the checkpoint's `shift`, or, with
`use_dynamic_shifting`, by exp(mu) for a resolution-dependent mu the family passes to `start`.
Unshifted sigmas are the scheduler's default spacing, or linspace(1, 1/steps, steps) where the
family's scheduler config says its pipeline passes those (`sigmas_from_steps`: Flux)."""

from typing import Any
import math

import numpy as np

from serving.core.interfaces import Array
from serving.core.samplers.base import Sampler, per_row, SamplerRun


class FlowMatchEuler(Sampler):
    name = "flow_match_euler"
    fits = "flow"

    def __init__(self, config: dict[str, Any], sigma_schedule: str = "default"):
        super().__init__(config, sigma_schedule)
        self.shift = float(config.get("shift", 1.0))
        self.dynamic = bool(config.get("use_dynamic_shifting", False))
        n = self.num_train_timesteps
        train = np.linspace(1, n, n, dtype=np.float32)[::-1] / n
        if not self.dynamic:
            train = self.shift * train / (1 + (self.shift - 1) * train)
        self.sigma_max, self.sigma_min = float(train[0]), float(train[-1])

    def _make_schedule(self, steps: int, mu: float | None = None) -> tuple[Any, ...]:
        n = self.num_train_timesteps
        if self.config.get("sigmas_from_steps"):  # FluxPipeline passes linspace(1, 1/steps, steps) itself
            sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)  # shifted in float32, as diffusers
        else:
            sigmas = np.linspace(self.sigma_max * n, self.sigma_min * n, steps) / n
        if self.dynamic:
            if mu is None:
                raise ValueError("flow_match_euler: this checkpoint shifts sigmas by resolution (mu is required)")
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        sigmas = sigmas.astype(np.float32)
        timesteps = (sigmas * n).astype(np.float64)
        return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def add_noise(self, run: SamplerRun, clean: Array, noise: Array, position: int) -> Array:
        if position >= run.steps:
            return clean
        sigma = np.float32(run.values[position])
        return (sigma * noise + (np.float32(1.0) - sigma) * clean).astype(np.float32)

    def step(
        self, runs: list[Any], positions: list[Any], model_output: Array, latents: Array, noise: Array | None
    ) -> tuple[Any, ...]:
        sigma = np.array([r.values[p] for r, p in zip(runs, positions)], np.float64)
        sigma_next = np.array([r.values[p + 1] for r, p in zip(runs, positions)], np.float64)
        x0: Array = (latents - per_row(sigma) * model_output).astype(np.float32)
        return (latents + per_row(sigma_next - sigma) * model_output).astype(np.float32), x0
