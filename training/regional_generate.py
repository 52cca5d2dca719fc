"""Regional-prompt images from the diffusers components in process, written apart from the
serving engine: the reference that served images are compared with, and the in-process generator
of `ldm eval --regions`.

Both modes as serving/core/regional_prompt.py states them, in torch: latent mode runs the UNet
on every context (and the negative prompt) and combines eps = sum_k W_k (u + g (c_k - u));
attention mode runs families/regional_unet.py's UNet on a conditional and an unconditional row.
The starting noise is the service's (serving.core.sampler.noise_generator), so with the same seed
a served image and this one start from the same latents; DDIM is diffusers' DDIMScheduler. The
negative prompt is "" (the eval's), and the images of one call have the same number of regions.
"""

import copy

import numpy as np
import torch
from diffusers import DDIMScheduler

from serving.core.sampler import noise_generator


class RegionalReference:
    def __init__(self, pipe):
        self.pipe = pipe
        self.vae_factor = pipe.vae_scale_factor
        self.attention_unet = None  # built on first use: a copy of the UNet with regional processors

    def _regional_unet(self):
        if self.attention_unet is None:
            from families.regional_unet import RegionalUNet

            self.attention_unet = RegionalUNet(copy.deepcopy(self.pipe.unet)).eval()
        return self.attention_unet

    @torch.no_grad()
    def _embed(self, texts) -> torch.Tensor:
        embeddings, _ = self.pipe.encode_prompt(list(texts), "cpu", 1, False)
        return embeddings

    @torch.no_grad()
    def images(self, items, guidance_scale: float, steps: int, mode: str, size: int = 64) -> np.ndarray:
        """uint8 [N, size, size, 3]. items: (prompt, serving.core.regions.Regions, seed) per image;
        images are denoised together, each depends only on its own item."""
        pipe = self.pipe
        if len({regions.count for _, regions, _ in items}) != 1:
            raise ValueError("the images of one call must have the same number of regions")
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        x = torch.from_numpy(self._noise([seed for _, _, seed in items], size))
        contexts = [self._embed([prompt, *regions.prompts]) for prompt, regions, _ in items]
        uncond = self._embed([""])[0]
        weights = [torch.from_numpy(regions.weights) for _, regions, _ in items]
        for t in scheduler.timesteps:
            if mode == "latent":
                eps = self._latent_step(x, t, contexts, uncond, weights, guidance_scale)
            else:
                eps = self._attention_step(x, t, contexts, uncond, weights, guidance_scale)
            x = scheduler.step(eps, t, x).prev_sample
        pixels = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return (pixels * 255).round().astype(np.uint8)

    def _noise(self, seeds, size) -> np.ndarray:
        """x_T of each seed, drawn as the service draws it."""
        shape = (self.pipe.unet.config.in_channels, size // self.vae_factor, size // self.vae_factor)
        return np.stack([noise_generator(int(seed)).standard_normal(shape, dtype=np.float32) for seed in seeds])

    @torch.no_grad()
    def plain_images(self, prompts, seeds, guidance_scale: float, steps: int, size: int = 64) -> np.ndarray:
        """The prompts without regions, from the same starting noise (diffusers' pipeline)."""
        x = self._noise(seeds, size)
        pixels = self.pipe(
            list(prompts),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=torch.from_numpy(x),
            output_type="np",
        ).images
        return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)

    def _latent_step(self, x, t, contexts, uncond, weights, g):
        count = len(contexts[0])  # K: base prompt and regions
        sample = x.repeat_interleave(count + 1, dim=0)
        context = torch.cat([torch.cat([c, uncond[None]]) for c in contexts])
        predictions = self.pipe.unet(sample, t, encoder_hidden_states=context).sample
        predictions = predictions.view(len(x), count + 1, *x.shape[1:])
        cond, u = predictions[:, :-1], predictions[:, -1:]
        w = torch.stack(weights)[:, :, None]  # [N, K, 1, h, w]
        guided = cond if g <= 1 else u + g * (cond - u)  # as diffusers: no guidance at a scale of 1 or less
        return (w * guided).sum(1)

    def _attention_step(self, x, t, contexts, uncond, weights, g):
        cond = torch.stack(contexts)  # [N, K, L, D]
        context = torch.cat([cond, uncond[None, None].expand_as(cond)])
        w = torch.stack(weights)
        predictions = self._regional_unet()(torch.cat([x, x]), t.expand(2 * len(x)), context, torch.cat([w, w]))
        e_cond, e_uncond = predictions.chunk(2)
        return e_cond if g <= 1 else e_uncond + g * (e_cond - e_uncond)
