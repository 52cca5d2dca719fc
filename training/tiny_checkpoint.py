"""Tiny random-weight Stable Diffusion checkpoints built from configs (nothing downloaded).

Same component classes, folder layout and noise schedule as the default model (SD's betas
rescaled to zero terminal SNR, v-prediction), scaled down so export, serving and tests run in seconds on 2 CPU cores. Deterministic: the same seed writes the same weights.

Three kinds, one per UNet layout the service serves:
- "base": text-to-image (4 latent channels in);
- "inpaint": diffusers' StableDiffusionInpaintPipeline layout (noisy latents, mask, masked-image
  latents: 4 + 1 + 4 channels in), with the base's text encoder, tokenizer and VAE (the same
  weights, so an export with both shares them);
- "upscale": diffusers' StableDiffusionUpscalePipeline layout (noisy latents and the noised
  low-resolution image: 4 + 3 channels in, the noise level as class labels), with the base's text
  encoder but its own VAE (scaling factor 0.08333) and schedules, as SD's x4 upscaler has.
"""
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, StableDiffusionUpscalePipeline, UNet2DConditionModel)

from training.tokenizer import build_word_tokenizer
from training.train import build_text_encoder, make_pipeline

VOCABULARY = (
    "a an the of on in at to and with above below left right top bottom centre center "
    "small large big tiny red green blue yellow purple orange cyan magenta white black grey gray "
    "circle square triangle star background photo picture cat dog astronaut horse"
).split()

TEXT_MAX_LENGTH = 16
TEXT_HIDDEN = 32
IMAGE_SIZE = 32  # pixels; the VAE downsamples by 4, so the latent is 8x8
LATENT_CHANNELS = 4
KINDS = ("base", "inpaint", "upscale")
MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's default


def _vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def _unet(in_channels: int, num_class_embeds=None) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(VOCABULARY, TEXT_MAX_LENGTH)
    text_encoder = build_text_encoder(tokenizer, hidden=TEXT_HIDDEN, mlp=64, layers=2)
    vae = _vae(scaling_factor=0.5)
    unet = _unet(LATENT_CHANNELS)
    return make_pipeline(vae, text_encoder, tokenizer, unet)


def build_tiny_inpaint_pipeline(seed: int = 0) -> StableDiffusionInpaintPipeline:
    base = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 1)
    return StableDiffusionInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        unet=_unet(2 * LATENT_CHANNELS + 1), scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_upscale_pipeline(seed: int = 0) -> StableDiffusionUpscalePipeline:
    base = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 2)
    # the schedules of SD's x4 upscaler (its scheduler and low_res_scheduler configs)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    low_res_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                      beta_schedule="scaled_linear")
    return StableDiffusionUpscalePipeline(
        vae=_vae(scaling_factor=0.08333), text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        unet=_unet(LATENT_CHANNELS + 3, num_class_embeds=1000), low_res_scheduler=low_res_scheduler,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, watermarker=None,
        max_noise_level=MAX_NOISE_LEVEL,
    )


def write_tiny_checkpoint(path, seed: int = 0, kind: str = "base") -> Path:
    builders = {"base": build_tiny_pipeline, "inpaint": build_tiny_inpaint_pipeline, "upscale": build_tiny_upscale_pipeline}
    if kind not in builders:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    builders[kind](seed).save_pretrained(path)
    return path
