"""A tiny random-weight Stable Diffusion checkpoint built from configs (nothing downloaded).

Same component classes, folder layout and noise schedule as the default model (SD's betas
rescaled to zero terminal SNR, v-prediction), scaled down so export, serving and tests run in seconds on 2 CPU cores. Deterministic: the same seed writes the same weights.
"""
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

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


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(VOCABULARY, TEXT_MAX_LENGTH)
    text_encoder = build_text_encoder(tokenizer, hidden=TEXT_HIDDEN, mlp=64, layers=2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=0.5,
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return make_pipeline(vae, text_encoder, tokenizer, unet)


def write_tiny_checkpoint(path, seed: int = 0) -> Path:
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path)
    return path
