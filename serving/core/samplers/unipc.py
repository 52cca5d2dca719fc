"""UniPC (Zhao et al. 2023), the bh2 variant with data prediction, order 2, as diffusers'
UniPCMultistepScheduler computes it: at each step a corrector (UniC) refines the sample the
previous predictor made, using this step's model output, then a predictor (UniP) goes to the next
noise level; first order at a job's first step and at its last."""

from typing import Any
import numpy as np

from serving.core.interfaces import Array
from serving.core.samplers.base import SamplerRun
from serving.core.samplers.vp import VPSolver


class UniPC(VPSolver):
    name = "unipc"
    solver_order = 2

    def step(
        self, runs: list[Any], positions: list[Any], model_output: Array, latents: Array, noise: Array | None
    ) -> tuple[Any, ...]:
        x0 = self.convert(runs, positions, model_output, latents)  # from the uncorrected sample, as diffusers
        corrected = latents.copy()
        for i, (run, p) in enumerate(zip(runs, positions)):
            if p > run.begin:  # the corrector needs the previous step's sample and output
                corrected[i] = self._correct(run, p, x0[i], corrected[i])
        prev = np.empty_like(latents)
        for i, (run, p) in enumerate(zip(runs, positions)):
            run.history = (run.history + [x0[i]])[-self.solver_order :]
            done = p - run.begin
            run.order = min(self.solver_order, run.steps - p, done + 1)
            run.last_sample = corrected[i]
            prev[i] = self._predict(run, p, corrected[i])
        return prev, x0

    def _coefficients(self, h: float, order: int) -> tuple[Any, ...]:
        """(h_phi_1, B_h, b) of the bh2 variant for a step of log-SNR length h."""
        hh = -h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial, b = 1, []
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial / h_phi_1)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return h_phi_1, h_phi_1, np.array(b)

    def _predict(self, run: SamplerRun, p: int, sample: Array) -> Array:
        alpha_t, sigma_t, lambda_t = self.lam(run, p + 1)
        _, sigma_s0, lambda_s0 = self.lam(run, p)
        with np.errstate(invalid="ignore", divide="ignore"):
            h = lambda_t - lambda_s0
            h_phi_1, b_h, _ = self._coefficients(h, run.order)
        m0 = run.history[-1]
        out = np.float32(sigma_t / sigma_s0) * sample - np.float32(alpha_t * h_phi_1) * m0
        if run.order == 2:
            rk = (self.lam(run, p - 1)[2] - lambda_s0) / h
            d1 = (run.history[-2] - m0) / np.float32(rk)
            out = out - np.float32(alpha_t * b_h) * (np.float32(0.5) * d1)
        result: Array = out.astype(np.float32)
        return result

    def _correct(self, run: SamplerRun, p: int, model_t: Array, sample: Array) -> Array:
        """UniC for the sample the last predictor made (run.last_sample -> sample at p)."""
        order = run.order
        alpha_t, sigma_t, lambda_t = self.lam(run, p)
        _, sigma_s0, lambda_s0 = self.lam(run, p - 1)
        h = lambda_t - lambda_s0
        h_phi_1, b_h, b = self._coefficients(h, order)
        m0 = run.history[-1]
        assert run.last_sample is not None  # a predictor ran before this corrector
        out = np.float32(sigma_t / sigma_s0) * run.last_sample - np.float32(alpha_t * h_phi_1) * m0
        if order == 1:
            rhos = np.array([0.5])
            correction = 0.0
        else:
            rk = (self.lam(run, p - 2)[2] - lambda_s0) / h
            rhos = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), b)
            correction = np.float32(rhos[0]) * ((run.history[-2] - m0) / np.float32(rk))
        result: Array = (out - np.float32(alpha_t * b_h) * (correction + np.float32(rhos[-1]) * (model_t - m0))).astype(
            np.float32
        )
        return result
