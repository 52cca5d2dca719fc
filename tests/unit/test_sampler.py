"""The DDIM loop against diffusers' DDIMScheduler over whole runs, with the same noise."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from serving.core.sampler import DDIMSchedule

SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def fake_model(x, t, alphas_cumprod):
    """A stand-in for the UNet: the exact noise that would take a fixed clean image to x at t,
    so latents stay at unit scale as with a trained model."""
    x0 = np.linspace(-1, 1, x[0].size, dtype=np.float32).reshape(x.shape[1:])
    a = float(alphas_cumprod[t])
    return ((x - np.sqrt(a) * x0) / np.sqrt(1 - a)).astype(np.float32)


def run_both(config, steps, eta, shape=(2, 4, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    x_ours = rng.standard_normal(shape).astype(np.float32)
    x_ref = torch.from_numpy(x_ours.copy())
    reference = DDIMScheduler(**config)
    reference.set_timesteps(steps)
    ours = DDIMSchedule.from_config(dict(reference.config))
    timesteps = ours.timesteps(steps)
    np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())
    for t in timesteps:
        noise = rng.standard_normal(shape).astype(np.float32)
        ref_out = reference.step(
            torch.from_numpy(fake_model(x_ref.numpy(), t, ours.alphas_cumprod)),
            int(t),
            x_ref,
            eta=eta,
            variance_noise=torch.from_numpy(noise),
        )
        rows = np.full(shape[0], t)
        x_ours, _ = ours.step(
            fake_model(x_ours, t, ours.alphas_cumprod),
            rows,
            ours.previous_timesteps(rows, np.full(shape[0], steps)),
            x_ours,
            np.full(shape[0], eta),
            noise,
        )
        x_ref = ref_out.prev_sample
    return x_ours, x_ref.numpy()


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"timestep_spacing": "trailing", "set_alpha_to_one": True},
        {"timestep_spacing": "linspace", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
        {"prediction_type": "v_prediction"},
        {"beta_schedule": "squaredcos_cap_v2", "clip_sample": True},
        # the default model's: zero terminal SNR (the first step starts from pure noise)
        {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    ],
)
def test_full_run_matches_diffusers(eta, overrides):
    ours, ref = run_both({**SD_CONFIG, **overrides}, steps=25, eta=eta)
    assert np.abs(ours - ref).max() <= 1e-5


def test_rows_at_different_timesteps_match_separate_runs():
    """A batch whose rows sit at different timesteps equals stepping each row alone."""
    schedule = DDIMSchedule.from_config(SD_CONFIG)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    t = np.array([981, 501, 21])
    steps = np.array([50, 10, 25])
    eta = np.array([0.0, 1.0, 0.3])
    batched, _ = schedule.step(eps, t, schedule.previous_timesteps(t, steps), x, eta, noise)
    for i in range(3):
        alone, _ = schedule.step(
            eps[i : i + 1],
            t[i : i + 1],
            schedule.previous_timesteps(t[i : i + 1], steps[i : i + 1]),
            x[i : i + 1],
            eta[i : i + 1],
            noise[i : i + 1],
        )
        np.testing.assert_array_equal(batched[i : i + 1], alone)


def test_unsupported_config_is_named():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMSchedule.from_config({**SD_CONFIG, "beta_schedule": "sigmoid"})
