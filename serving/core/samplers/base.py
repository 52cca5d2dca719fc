"""The sampler protocol: what the engine needs from a sampler, and a job's own state in it.

A sampler (one per served checkpoint and sampler name, shared by all jobs) answers, for a run of
`steps` steps:
- `start(steps, strength, eta)`: the job's `SamplerRun`: the UNet timestep of every position of
  the full schedule (fractional for sigma-space samplers) and the first position it denoises
  (image-to-image denoises the last int(steps x strength) positions, as diffusers' get_timesteps);
- `initial_latents(run, noise)`: x_T from the job's standard-normal draw (init_noise_sigma);
- `add_noise(run, clean, noise, position)`: the forward process to a position's noise level
  (image-to-image's start, latent-blend inpainting after each step; position == len: clean);
- `input_scale(run, position)`: the factor the latents are scaled by before the UNet;
- `step(runs, positions, model_output, latents, noise)`: one update of every row (the rows of
  jobs on this sampler), returning (previous latents, predicted x_0), float32.
`draws_noise(run, position)` says whether that step consumes a standard-normal draw from the
job's seed stream (ancestral, SDE, LCM, DDIM with eta > 0), so images stay batch-invariant.

Coefficients are per-row scalars computed from each run's schedule (a short loop over at most
max_rows rows); the tensor arithmetic is one vectorised expression over all rows. Schedules are
float32 where diffusers keeps them in float32 tensors, so results agree with its schedulers.
"""

from typing import Any
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from serving.core.interfaces import Array
from serving.core.sampler import train_alphas_cumprod

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(eq=False)
class SamplerRun:
    """One job's walk through its sampler's schedule (never shared between jobs)."""

    sampler: "Sampler"
    steps: int  # the schedule's length (the request's steps)
    timesteps: Array  # [steps] the UNet's timestep at each position (float64)
    values: Array  # the sampler's schedule at each position (sigmas: [steps + 1], the last 0)
    begin: int = 0  # first position it denoises
    eta: float = 0.0  # DDIM's eta
    history: list[Any] = field(default_factory=list)  # multistep solvers: converted model outputs, newest last
    last_sample: Array | None = None  # UniPC: the sample its corrector starts from
    order: int = 0  # UniPC: the order of its last predictor

    @property
    def denoising_timesteps(self) -> Array:
        """The UNet timesteps of the steps this job runs."""
        return self.timesteps[self.begin :]


class Sampler:
    """Base class: the schedule helpers every sampler shares."""

    name = ""
    fits = "diffusion"  # "diffusion": epsilon / v / sample models; "flow": flow-matching models

    def __init__(self, config: dict[str, Any], sigma_schedule: str = "default"):
        self.config = config
        self.sigma_schedule = sigma_schedule
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self._schedule = lru_cache(maxsize=256)(self._make_schedule)

    def _make_schedule(self, steps: int, mu: float | None = None) -> tuple[Any, ...]:
        """(timesteps [steps], per-position schedule values), cached per step count (and mu)."""
        raise NotImplementedError

    def start(
        self, steps: int, strength: float = 1.0, eta: float = 0.0, mu: float | None = None, kept: int | None = None
    ) -> SamplerRun:
        """A job's run of `steps` steps; `mu`: the resolution-dependent shift of flow-matching
        checkpoints that shift dynamically (their family computes it); `kept`: the steps it
        denoises where its family's pipeline counts them otherwise (default: kept_steps)."""
        timesteps, values = self._schedule(steps, mu)
        kept = kept_steps(steps, strength) if kept is None else kept
        return SamplerRun(self, steps, timesteps, values, begin=steps - kept, eta=eta)

    def draws_noise(self, run: SamplerRun, position: int) -> bool:
        return False

    def initial_latents(self, run: SamplerRun, noise: Array) -> Array:
        return noise

    def input_scale(self, run: SamplerRun, position: int) -> float:
        return 1.0

    def add_noise(self, run: SamplerRun, clean: Array, noise: Array, position: int) -> Array:
        raise NotImplementedError

    def step(
        self, runs: list[Any], positions: list[Any], model_output: Array, latents: Array, noise: Array | None
    ) -> tuple[Any, ...]:
        raise NotImplementedError


class TrainSigmaSampler(Sampler):
    """A sampler whose schedule interpolates the training sigmas at its timesteps (Euler, the
    VP solvers); `timestep_spacing` defaults to diffusers' linspace for them."""

    def __init__(self, config: dict[str, Any], sigma_schedule: str = "default"):
        super().__init__(config, sigma_schedule)
        self.train_sigmas = train_sigmas(sigma_alphas_cumprod(config))
        self.spacing = config.get("timestep_spacing", "linspace")


def kept_steps(steps: int, strength: float) -> int:
    """How many of a run's `steps` image-to-image denoises at `strength`: its last
    int(steps x strength) (diffusers' SD get_timesteps; families/ `kept_steps` says each
    family's, which the runner passes to `start`)."""
    return min(int(steps * strength), steps)


def per_row(values: Any) -> Array:
    """[B] scalars -> float32 [B, 1, 1, 1], to scale rows of [B, C, h, w]."""
    return np.asarray(values, dtype=np.float64).astype(np.float32)[:, None, None, None]


def sigma_alphas_cumprod(config: dict[str, Any]) -> Array:
    """alpha-bar as diffusers' sigma-space schedulers hold it: float32, and at zero terminal SNR
    the last value is 2^-24 instead of 0 (an infinite sigma otherwise)."""
    alphas_cumprod = train_alphas_cumprod(config).astype(np.float32)
    if config.get("rescale_betas_zero_snr", False):
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod


def train_sigmas(alphas_cumprod: Array) -> Array:
    """sigma_t = sqrt((1 - alpha-bar) / alpha-bar), ascending in t (float32, as diffusers)."""
    out: Array = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).astype(np.float32)
    return out


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> Array:
    """Karras et al. (2022) eq. 5: noise levels spaced evenly in sigma^(1/rho), descending."""
    ramp = np.linspace(0, 1, steps)
    out: Array = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return out


def sigma_to_t(sigmas: Array, log_train_sigmas: Array) -> Array:
    """The (fractional) training timestep of each sigma: linear interpolation in log sigma
    between the two training timesteps around it."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_train_sigmas[low] - log_sigma) / (log_train_sigmas[low] - log_train_sigmas[high]), 0, 1)
    out: Array = ((1 - w) * low + w * high).reshape(np.shape(sigmas))
    return out


def vp_alpha_sigma(sigma: float | np.floating[Any]) -> tuple[Any, ...]:
    """(alpha_t, sigma_t) of the variance-preserving process at VE noise level sigma."""
    alpha = 1.0 / np.sqrt(np.float64(sigma) ** 2 + 1)
    return alpha, np.float64(sigma) * alpha


def x0_from_vp(prediction_type: str, model_output: Array, sample: Array, alpha: Any, sigma: Any) -> Array:
    """The predicted clean latents from a model output at VP noise level (alpha, sigma) per row."""
    if prediction_type == "epsilon":
        out: Array = (sample - per_row(sigma) * model_output) / per_row(alpha)
        return out
    if prediction_type == "v_prediction":
        out = per_row(alpha) * sample - per_row(sigma) * model_output
        return out
    return model_output.astype(np.float32)
