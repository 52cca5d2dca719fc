"""DDIM (serving/core/sampler.py's update, unchanged) behind the sampler protocol."""

from typing import Any

import numpy as np

from serving.core.interfaces import Array
from serving.core.sampler import DDIMSchedule
from serving.core.samplers.base import Sampler, SamplerRun


class DDIM(Sampler):
    name = "ddim"

    def __init__(self, config: dict[str, Any], sigma_schedule: str = "default"):
        super().__init__(config, sigma_schedule)
        self.schedule = DDIMSchedule.from_config(config)

    def _make_schedule(self, steps: int, mu: float | None = None) -> tuple[Any, ...]:
        timesteps = self.schedule.timesteps(steps)
        return timesteps.astype(np.float64), timesteps

    def draws_noise(self, run: SamplerRun, position: int) -> bool:
        return run.eta > 0

    def add_noise(self, run: SamplerRun, clean: Array, noise: Array, position: int) -> Array:
        if position >= run.steps:
            return clean
        return self.schedule.add_noise(clean, noise, int(run.timesteps[position]))

    def step(
        self, runs: list[Any], positions: list[Any], model_output: Array, latents: Array, noise: Array | None
    ) -> tuple[Any, ...]:
        t = np.array([r.values[p] for r, p in zip(runs, positions)], dtype=np.int64)
        steps = np.array([r.steps for r in runs])
        eta = np.array([r.eta for r in runs])
        out: tuple[Any, ...] = self.schedule.step(
            model_output, t, self.schedule.previous_timesteps(t, steps), latents, eta, noise
        )
        return out
