"""A Stable-Diffusion-1.5-size checkpoint with random weights, built from configs (nothing is
downloaded): the UNet (859.5 M parameters, 64x64 latents), VAE (512 px) and CLIP ViT-L/14 text
encoder (77 tokens x 768, vocabulary 49,408) have SD-1.5's architectures and its DDIM schedule, so
every kernel, shape and byte count of a denoising step is SD-1.5's. The tokenizer is our small
word-level one padded to SD's 77 tokens (CLIP's BPE files cannot be fetched here); it only maps
words to ids, which costs nothing next to the models. The images are noise: this is for timing."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from training.tiny_checkpoint import VOCABULARY
from training.tokenizer import build_word_tokenizer

TEXT_LENGTH = 77
UNET_PARAMETERS = 859_520_964  # diffusers' SD-1.5 UNet (the anchor measurements' model)


def build_sd15_pipeline(device: str = "cpu", seed: int = 0) -> StableDiffusionPipeline:
    """Initialised on `device` (a GPU initialises the 1.07 B parameters in a second or two)."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(VOCABULARY, TEXT_LENGTH)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=TEXT_LENGTH,
                hidden_act="quick_gelu",
                projection_dim=768,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    scheduler = DDIMScheduler(  # SD-1.5's scheduler config, as DDIM
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_sd15_checkpoint(path, device: str = "cpu") -> Path:
    """fp16 safetensors (half the bytes to write and read; the runners load fp16 on GPU anyway)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    pipe = build_sd15_pipeline(device)
    pipe.to(device="cpu", dtype=torch.float16).save_pretrained(path)
    return path
