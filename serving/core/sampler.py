"""DDIM sampling (Song et al., 2020) as pure functions, vectorised over batch rows.

Each row may sit at a different timestep and use its own eta, so requests at different points
of their own schedules can share one UNet call. Numbers in comments refer to the equations of
the DDIM paper; the arithmetic follows diffusers' `DDIMScheduler.step` so results agree with it.
Imports nothing from Triton or torch.
"""

from dataclasses import dataclass
import math
from typing import Any

import numpy as np

from serving.core.interfaces import Array


@dataclass(frozen=True)
class DDIMSchedule:
    """The noise schedule a checkpoint was trained with (its scheduler config)."""

    alphas_cumprod: Array  # float64 [num_train_timesteps]
    final_alpha_cumprod: float
    num_train_timesteps: int
    timestep_spacing: str
    steps_offset: int
    prediction_type: str
    clip_sample_range: float | None  # None: no clipping of the predicted x0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DDIMSchedule":
        n = int(config.get("num_train_timesteps", 1000))
        alphas_cumprod = train_alphas_cumprod(config)
        if config.get("thresholding", False):
            raise ValueError("scheduler config: 'thresholding' (dynamic thresholding) is not supported")
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler config: unknown prediction_type {prediction_type!r}")
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"scheduler config: unknown timestep_spacing {spacing!r}")
        return cls(
            alphas_cumprod=alphas_cumprod,
            final_alpha_cumprod=1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0]),
            num_train_timesteps=n,
            timestep_spacing=spacing,
            steps_offset=int(config.get("steps_offset", 0)),
            prediction_type=prediction_type,
            clip_sample_range=float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None,
        )

    def timesteps(self, num_inference_steps: int) -> Array:
        """The descending timesteps of an `num_inference_steps` run (as diffusers' set_timesteps)."""
        n, steps = self.num_train_timesteps, num_inference_steps
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be in [1, {n}], got {steps}")
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = n // steps
            return (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + self.steps_offset
        spacing = n / steps
        out: Array = np.round(np.arange(n, 0, -spacing)).astype(np.int64) - 1
        return out

    def strength_timesteps(self, num_inference_steps: int, strength: float) -> Array:
        """The tail of an `num_inference_steps` run that image-to-image denoises: the last
        int(steps x strength) timesteps (diffusers' get_timesteps)."""
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        return self.timesteps(num_inference_steps)[num_inference_steps - kept :]

    def add_noise(self, samples: Array, noise: Array, timestep: int) -> Array:
        """The forward process q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise.
        At zero terminal SNR alpha_bar is exactly 0 at the last timestep, so this is the noise itself."""
        alpha = self.alphas_cumprod[int(timestep)]
        return (np.float32(np.sqrt(alpha)) * samples + np.float32(np.sqrt(1.0 - alpha)) * noise).astype(np.float32)

    def previous_timesteps(self, timesteps: Array, num_inference_steps: Array) -> Array:
        """t - T/steps per row, as diffusers computes the previous timestep (negative: the end)."""
        out: Array = timesteps - self.num_train_timesteps // num_inference_steps
        return out

    def step(
        self,
        model_output: Array,
        timesteps: Any,
        prev_timesteps: Any,
        latents: Array,
        eta: Any,
        noise: Array | None = None,
    ) -> tuple[Any, ...]:
        """One DDIM update for every row.

        model_output, latents: float32 [B, C, H, W]; timesteps, prev_timesteps: int [B];
        eta: float [B]; noise: float32 [B, C, H, W] (used by rows with eta > 0).
        Returns (previous latents x_{t-1}, predicted x_0), both float32 [B, C, H, W].
        """
        timesteps = np.asarray(timesteps, dtype=np.int64)
        prev_timesteps = np.asarray(prev_timesteps, dtype=np.int64)
        eta = np.asarray(eta, dtype=np.float64)
        # alpha-bar at t and at t-1 (the final alpha once the schedule runs out)
        alpha_t = self.alphas_cumprod[timesteps]
        alpha_prev = np.where(
            prev_timesteps >= 0, self.alphas_cumprod[np.maximum(prev_timesteps, 0)], self.final_alpha_cumprod
        )
        beta_t = 1.0 - alpha_t

        def per_row(values: Array) -> Array:
            return values.astype(np.float32)[:, None, None, None]

        eps = model_output.astype(np.float32)
        x_t = latents.astype(np.float32)
        # (12) predicted x_0 and the noise direction, from the model's parameterisation
        x0: Array
        eps_hat: Array
        if self.prediction_type == "epsilon":
            x0 = (x_t - per_row(np.sqrt(beta_t)) * eps) / per_row(np.sqrt(alpha_t))
            eps_hat = eps
        elif self.prediction_type == "sample":
            x0 = eps
            eps_hat = (x_t - per_row(np.sqrt(alpha_t)) * x0) / per_row(np.sqrt(beta_t))
        else:  # v_prediction
            x0 = per_row(np.sqrt(alpha_t)) * x_t - per_row(np.sqrt(beta_t)) * eps
            eps_hat = per_row(np.sqrt(alpha_t)) * eps + per_row(np.sqrt(beta_t)) * x_t
        if self.clip_sample_range is not None:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        # (16) sigma_t(eta)
        variance = ((1.0 - alpha_prev) / beta_t) * (1.0 - alpha_t / alpha_prev)
        sigma = eta * np.sqrt(variance)
        # (12) direction pointing to x_t, then x_{t-1}
        direction = per_row(np.sqrt(np.maximum(1.0 - alpha_prev - sigma**2, 0.0))) * eps_hat
        x_prev = per_row(np.sqrt(alpha_prev)) * x0 + direction
        if np.any(eta > 0):
            if noise is None:
                raise ValueError("noise is required for rows with eta > 0")
            x_prev = x_prev + per_row(sigma) * noise.astype(np.float32)
        return x_prev.astype(np.float32), x0.astype(np.float32)


def train_alphas_cumprod(config: dict[str, Any]) -> Array:
    """alpha-bar of every training timestep (float64), from a scheduler config's betas."""
    n = int(config.get("num_train_timesteps", 1000))
    betas = _betas(config, n)
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescaled_to_zero_terminal_snr(betas)
    return np.cumprod(1.0 - betas)


def _betas(config: dict[str, Any], n: int) -> Array:
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float64)
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise ValueError(f"scheduler config: unknown beta_schedule {schedule!r}")


def _rescaled_to_zero_terminal_snr(betas: Array) -> Array:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last timestep carries
    no signal (SNR 0) while the first keeps its value; the betas that give that alpha_bar."""
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    alphas_cumprod = root**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    out: Array = 1.0 - alphas
    return out


def guided_noise(eps_uncond: Array, eps_cond: Array, guidance_scale: Array) -> Array:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u), one scale per row."""
    scale = np.asarray(guidance_scale, dtype=np.float32)[:, None, None, None]
    out: Array = eps_uncond + scale * (eps_cond - eps_uncond)
    return out


def noise_generator(seed: int) -> np.random.Generator:
    """A request's own noise source: its starting latents x_T, then any eta > 0 noise, are drawn
    from it in order, so an image depends on its seed alone and never on its batch-mates."""
    return np.random.Generator(np.random.PCG64(seed))


def image_noise_generator(seed: int) -> np.random.Generator:
    """A second stream of a request's seed for what its input images need: the VAE posterior
    samples of its init image, then of its masked image, then the upscaler's low-res noise (each
    only if the task uses it). Kept apart so x_T and eta noise are drawn as for text-to-image."""
    return np.random.Generator(np.random.PCG64([seed, 1]))
