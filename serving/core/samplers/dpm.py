"""DPM-Solver++(2M) and its SDE variant (Lu et al. 2022), multistep with data prediction and the
midpoint rule, as diffusers' DPMSolverMultistepScheduler computes them (solver_order 2,
lower_order_final, final sigma 0): first order at a job's first step and at the last step,
second order in between from the job's own last data prediction."""

from typing import Any
import numpy as np

from serving.core.interfaces import Array
from serving.core.samplers.base import per_row, SamplerRun
from serving.core.samplers.vp import VPSolver


class DPMSolverPP2M(VPSolver):
    name = "dpmpp_2m"
    sde = False

    def draws_noise(self, run: SamplerRun, position: int) -> bool:
        return self.sde

    def step(
        self, runs: list[Any], positions: list[Any], model_output: Array, latents: Array, noise: Array | None
    ) -> tuple[Any, ...]:
        x0 = self.convert(runs, positions, model_output, latents)
        a, b, c = [], [], []  # prev = a * latents + b * D0 + c * D1 (+ noise term)
        noise_scale, previous = [], []
        for run, p in zip(runs, positions):
            alpha_t, sigma_t, lambda_t = self.lam(run, p + 1)
            _, sigma_s, lambda_s = self.lam(run, p)
            h = lambda_t - lambda_s
            second = p > run.begin and p != run.steps - 1 and len(run.history) > 0
            r0 = (lambda_s - self.lam(run, p - 1)[2]) / h if second else 1.0
            if self.sde:
                decay = 1.0 - np.exp(-2.0 * h)
                a.append(sigma_t / sigma_s * np.exp(-h))
                b.append(alpha_t * decay)
                c.append(0.5 * alpha_t * decay / r0 if second else 0.0)
                noise_scale.append(sigma_t * np.sqrt(decay))
            else:
                a.append(sigma_t / sigma_s)
                b.append(-alpha_t * np.expm1(-h))
                c.append(-0.5 * alpha_t * np.expm1(-h) / r0 if second else 0.0)
            previous.append(run.history[-1] if second else np.zeros_like(latents[0]))
        d1 = x0 - np.stack(previous)
        prev = per_row(a) * latents + per_row(b) * x0 + per_row(c) * d1
        if self.sde:
            prev = prev + per_row(noise_scale) * noise
        for i, run in enumerate(runs):
            run.history = [x0[i]]
        return prev.astype(np.float32), x0


class DPMSolverPP2MSDE(DPMSolverPP2M):
    name = "dpmpp_2m_sde"
    sde = True
