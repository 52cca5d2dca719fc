"""Tiny random-weight Stable Diffusion checkpoints built from configs (nothing downloaded).

Same component classes, folder layout and noise schedule as the default model (SD's betas
rescaled to zero terminal SNR, v-prediction), scaled down so export, serving and tests run in seconds on 2 CPU cores. Deterministic: the same seed writes the same weights.

Kinds, one per UNet layout:
- "base": text-to-image (4 latent channels in);
- "inpaint": diffusers' StableDiffusionInpaintPipeline layout (noisy latents, mask, masked-image
  latents: 4 + 1 + 4 channels in), with the base's text encoder, tokenizer and VAE (the same
  weights, so an export with both shares them);
- "upscale": diffusers' StableDiffusionUpscalePipeline layout (noisy latents and the noised
  low-resolution image: 4 + 3 channels in, the noise level as class labels), with the base's text
  encoder but its own VAE (scaling factor 0.08333) and schedules, as SD's x4 upscaler has;
- "sdxl": diffusers' StableDiffusionXLPipeline layout: two CLIP text encoders (CLIPTextModel and
  CLIPTextModelWithProjection, each with its own word-level tokenizer), a UNet conditioned on their
  penultimate hidden states concatenated (cross-attention width 32 + 32) and on
  addition_embed_type "text_time" (the second encoder's projected pooled output, 16 numbers, and
  6 size/crop time ids), a VAE like the base's with SDXL's scaling factor 0.13025, the base's
  zero-terminal-SNR v-prediction DDIM schedule, force_zeros_for_empty_prompt;
- "sdxl-inpaint": StableDiffusionXLInpaintPipeline's 9-channel UNet (4 + 1 + 4 channels in) with
  the "sdxl" kind's text encoders, tokenizers and VAE (the same weights);
- "flux": diffusers' FluxPipeline layout, guidance-distilled as FLUX.1-dev: a CLIP text encoder
  (its pooled output), a T5 encoder (its sequence, FLUX_T5_LENGTH tokens), a
  FluxTransformer2DModel (1 + 1 layers) over 2x2-packed latents with guidance as an input, a VAE
  with Flux's scaling and shift factors and no quant convs, FlowMatchEulerDiscreteScheduler with
  resolution-dependent shifting (FLUX.1-dev's config);
- "flux-schnell": the same without the guidance input and with a static shift of 1 (schnell's).
Sizes follow diffusers' own tiny SDXL test configs, adapted (not copied).
"""

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from training.tokenizer import build_word_tokenizer
from training.train import build_scheduler, build_text_encoder, make_pipeline, text_config

VOCABULARY = (
    "a an the of on in at to and with above below left right top bottom centre center "
    "small large big tiny red green blue yellow purple orange cyan magenta white black grey gray "
    "circle square triangle star background photo picture cat dog astronaut horse"
).split()

TEXT_MAX_LENGTH = 16
TEXT_HIDDEN = 32
IMAGE_SIZE = 32  # pixels; the VAE downsamples by 4, so the latent is 8x8
LATENT_CHANNELS = 4
KINDS = ("base", "inpaint", "upscale", "sdxl", "sdxl-inpaint", "flux", "flux-schnell")
MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's default

# SDXL kinds (real SDXL: 768 + 1280 hidden, projection 1280, time embedding 256, 77 tokens).
# The projection width differs from the hidden width on purpose: a pooled output taken before the
# projection (or from the wrong encoder) fails on its shape instead of passing silently.
SDXL_TEXT_HIDDEN = (32, 32)  # text_encoder (CLIPTextModel), text_encoder_2 (CLIPTextModelWithProjection)
SDXL_PROJECTION_DIM = 16  # text_encoder_2's projected pooled output: the UNet's text_embeds
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim, per time id (6 of them)
SDXL_TIME_IDS = 6  # original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w)
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE scaling factor
# tokenizer_2 knows a few more words, so one prompt gets different ids from the two tokenizers (the
# words sort early and shift the ids after them): ids from the wrong tokenizer fail parity. Real
# SDXL's two tokenizers share CLIP's vocabulary but pad differently ("<|endoftext|>" and "!").
SDXL_TOKENIZER_2_EXTRA_WORDS = ("aerial", "drawing", "painting", "sketch")


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
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=_unet(2 * LATENT_CHANNELS + 1),
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_upscale_pipeline(seed: int = 0) -> StableDiffusionUpscalePipeline:
    base = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 2)
    # the schedules of SD's x4 upscaler (its scheduler and low_res_scheduler configs)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    low_res_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"
    )
    return StableDiffusionUpscalePipeline(
        vae=_vae(scaling_factor=0.08333),
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=_unet(LATENT_CHANNELS + 3, num_class_embeds=1000),
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=MAX_NOISE_LEVEL,
    )


def _sdxl_unet(in_channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),  # heads per block, as SDXL's config means it
        use_linear_projection=True,
        cross_attention_dim=sum(SDXL_TEXT_HIDDEN),
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_TIME_IDS * SDXL_TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
        norm_num_groups=8,
    )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed + 3)
    tokenizer = build_word_tokenizer(VOCABULARY, TEXT_MAX_LENGTH)
    tokenizer_2 = build_word_tokenizer(VOCABULARY + list(SDXL_TOKENIZER_2_EXTRA_WORDS), TEXT_MAX_LENGTH)
    # 2 layers: the UNet reads the penultimate hidden states, the pooled output the last
    text_encoder = CLIPTextModel(text_config(tokenizer, SDXL_TEXT_HIDDEN[0], 2 * SDXL_TEXT_HIDDEN[0], 2))
    text_encoder_2 = CLIPTextModelWithProjection(
        text_config(tokenizer_2, SDXL_TEXT_HIDDEN[1], 2 * SDXL_TEXT_HIDDEN[1], 2, projection_dim=SDXL_PROJECTION_DIM)
    )
    vae = _vae(scaling_factor=SDXL_VAE_SCALING)
    unet = _sdxl_unet(LATENT_CHANNELS)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_sdxl_inpaint_pipeline(seed: int = 0) -> StableDiffusionXLInpaintPipeline:
    base = build_tiny_sdxl_pipeline(seed)
    torch.manual_seed(seed + 4)
    return StableDiffusionXLInpaintPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=_sdxl_unet(2 * LATENT_CHANNELS + 1),
        scheduler=base.scheduler,
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


# Flux kinds (real FLUX.1: CLIP-L 768 pooled, T5-XXL 4096 x 512 tokens, 16 latent channels, 19 + 38
# layers). T5's width differs from CLIP's so a pooled output fed where the sequence goes fails on
# its shape; the latent has 4 channels (16 packed), as the other tiny kinds.
FLUX_T5_LENGTH = 24  # tokens of the T5 sequence (FluxPipeline's max_sequence_length; 512 for real FLUX.1-dev)
FLUX_T5_HIDDEN = 48  # T5 d_model: the transformer's joint_attention_dim
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159  # FLUX.1's VAE


def _flux_scheduler(dynamic: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:  # FLUX.1-dev's scheduler config
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # FLUX.1-schnell's


def build_tiny_flux_pipeline(seed: int = 0, guidance: bool = True):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed + 5)
    tokenizer = build_word_tokenizer(VOCABULARY, TEXT_MAX_LENGTH)
    tokenizer_2 = build_word_tokenizer(VOCABULARY + list(SDXL_TOKENIZER_2_EXTRA_WORDS), FLUX_T5_LENGTH)
    text_encoder = CLIPTextModel(text_config(tokenizer, TEXT_HIDDEN, 2 * TEXT_HIDDEN, 2))
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=FLUX_T5_HIDDEN,
            d_kv=12,
            d_ff=96,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_T5_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=FLUX_VAE_SCALING,
        shift_factor=FLUX_VAE_SHIFT,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return FluxPipeline(
        scheduler=_flux_scheduler(guidance),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def write_tiny_checkpoint(path, seed: int = 0, kind: str = "base") -> Path:
    builders = {
        "base": build_tiny_pipeline,
        "inpaint": build_tiny_inpaint_pipeline,
        "upscale": build_tiny_upscale_pipeline,
        "sdxl": build_tiny_sdxl_pipeline,
        "sdxl-inpaint": build_tiny_sdxl_inpaint_pipeline,
        "flux": build_tiny_flux_pipeline,
        "flux-schnell": lambda seed: build_tiny_flux_pipeline(seed, guidance=False),
    }
    if kind not in builders:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    builders[kind](seed).save_pretrained(path)
    return path
