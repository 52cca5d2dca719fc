"""Fits the latent-to-RGB preview map of a checkpoint from its own VAE decoder."""
import numpy as np

from serving.models.onnx import OnnxComponent


def fit_preview(vae_decoder_onnx, latent_channels: int, latent_size: int, vae_factor: int, samples: int = 8) -> dict:
    """Least squares from latent cells to the decoder's average colour over each cell's pixels."""
    rng = np.random.default_rng(0)
    decoder = OnnxComponent(vae_decoder_onnx)
    latents = rng.standard_normal((samples, latent_channels, latent_size, latent_size), dtype=np.float32)
    images = decoder(latents=latents)["images"]  # [N, H, W, 3]
    n, h, w, _ = images.shape
    pooled = images.reshape(n, h // vae_factor, vae_factor, w // vae_factor, vae_factor, 3).mean(axis=(2, 4))
    x = latents.transpose(0, 2, 3, 1).reshape(-1, latent_channels)
    x = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    y = pooled.reshape(-1, 3)
    solution, *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"weights": solution[:-1].round(5).tolist(), "bias": solution[-1].round(5).tolist()}
