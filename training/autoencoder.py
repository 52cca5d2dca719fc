"""First stage: a KL-regularised autoencoder (diffusers AutoencoderKL), downsampling factor 4.

64x64x3 images -> 16x16x4 latents (f=4, the paper's sweet spot). The loss is reconstruction
(L1 + MSE: L1 keeps edges sharp, MSE is what PSNR measures) plus a small KL weight, as in the
paper's KL-reg models. Two changes make it learn in the minutes 2 CPU cores allow (measured: without
them, after 800 steps it drew colourless blobs at 21 dB): object pixels weigh 10x in the
reconstruction loss (objects are ~5% of the pixels, so a plain mean first learns backgrounds only),
and the posterior log-variance starts at -6, so sampling noise does not drown the latent before the
encoder has learnt to use it (the small KL weight lets it grow where it costs nothing). No patch discriminator: on flat-colour shapes the reconstruction loss
alone already gives sharp edges, and 2 CPU cores cannot afford a second network.
"""
import math

import numpy as np
import torch
from diffusers import AutoencoderKL

from training.data import IMAGE_SIZE, eval_scenes, render, training_batch

KL_WEIGHT = 1e-6
OBJECT_WEIGHT = 10.0
INITIAL_LOGVAR = -6.0


def build_vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,  # two downsamplings: f=4
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        # One group: GroupNorm with many groups subtracts each group's spatial mean, which on a
        # flat image is the background's value, so backgrounds (and colours in general) became
        # indistinguishable after the decoder's last norm; one group keeps the channel pattern.
        norm_num_groups=1,
        sample_size=IMAGE_SIZE,
    )
    with torch.no_grad():  # quant_conv outputs (mean, logvar) per latent channel
        vae.quant_conv.bias[vae.config.latent_channels :] = INITIAL_LOGVAR
    return vae


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + MSE, object pixels (anything unlike the corner, which is always background) weighted up."""
    on_object = (x != x[:, :, :1, :1]).any(dim=1, keepdim=True)
    weight = 1 + (OBJECT_WEIGHT - 1) * on_object.float()
    return (weight * ((rec - x).abs() + (rec - x) ** 2)).mean()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB over whole uint8 image sets (one MSE over all pixels)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * math.log10(255.0**2 / max(mse, 1e-12)))


def held_out_images(count: int = 64) -> np.ndarray:
    """Images never seen by the VAE: held-out colour-shape combos from the eval set."""
    return np.stack([render(s) for s in eval_scenes(count, held_out=True, seed=99)])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch])
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample))
    return np.concatenate(out)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, rng: np.random.Generator, count: int = 512) -> float:
    """1 / std of latents, so diffusion sees unit-variance inputs (as SD's 0.18215)."""
    images, _ = training_batch(rng, count)
    z = vae.encode(to_tensor(images)).latent_dist.sample()
    return float(1.0 / z.std())


def train_vae(steps: int, batch_size: int, lr: float, seed: int, log, eval_every: int = 100):
    """Train from scratch; returns the VAE with its scaling_factor set. `log(str)` reports."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    test = held_out_images()
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, {steps} steps x {batch_size}")
    for step in range(1, steps + 1):
        images, _ = training_batch(rng, batch_size)
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = reconstruction_loss(rec, x) + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            vae.eval()
            log(f"vae step {step}/{steps} loss {loss.item():.4f} held-out PSNR {psnr(test, reconstruct(vae, test)):.2f} dB")
            vae.train()
    vae.eval()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, rng))
    return vae

