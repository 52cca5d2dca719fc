"""Fits the latent-to-RGB preview map of a checkpoint from its own VAE decoder."""

import numpy as np

# The decoder is convolutional, so a small latent fits the same per-cell map as the native size
# at a fraction of the cost (an SD-size VAE decodes 16x16 latents on CPU in seconds, 64x64 in minutes).
FIT_LATENT_SIZE = 16


def fit_preview(decode, latent_channels: int, latent_size: int, vae_factor: int, samples: int = 8) -> dict:
    """Least squares from latent cells to the decoder's average colour over each cell's pixels.
    `decode`: latents float32 [N, C, h, w] -> images float32 [N, H, W, 3] in [0, 1]."""
    rng = np.random.default_rng(0)
    size = min(latent_size, FIT_LATENT_SIZE)
    latents = rng.standard_normal((samples, latent_channels, size, size), dtype=np.float32)
    images = decode(latents)  # [N, H, W, 3]
    n, h, w, _ = images.shape
    pooled = images.reshape(n, h // vae_factor, vae_factor, w // vae_factor, vae_factor, 3).mean(axis=(2, 4))
    x = latents.transpose(0, 2, 3, 1).reshape(-1, latent_channels)
    x = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    y = pooled.reshape(-1, 3)
    solution, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"weights": solution[:-1].round(5).tolist(), "bias": solution[-1].round(5).tolist()}
