"""The SDXL family (StableDiffusionXLPipeline, its img2img and inpainting kin): what differs from
Stable Diffusion 1.x/2.x (families/sd.py), as diffusers 0.42.1's StableDiffusionXLPipeline does it:
- two text encoders (CLIPTextModel, CLIPTextModelWithProjection), each with its own tokenizer:
  the context is both encoders' penultimate hidden states side by side, and the second one's
  projected pooled output is the UNet's per-row `text_embeds` (families/sdxl_torch.py);
- `force_zeros_for_empty_prompt`: without a negative prompt the unconditional row's context and
  text_embeds are zeros (the engine's text encoding reads CheckpointInfo.zero_empty_negative);
- per-row `time_ids`: original_size (h, w) + crops_coords_top_left (top, left) + target_size
  (h, w), from the request fields `original_size`, `crop_top_left`, `target_size`, with the
  pipeline's defaults: the output size, (0, 0), the output size. The unconditional row gets the
  same ids (diffusers' negative_* sizes default to the positive ones);
- the VAE's scaling factor (0.13025 for SDXL) is read from the checkpoint as for every family;
  its latent statistics, where its config has them, apply in the VAE's exports (sdxl_torch.py);
- the VAE runs in FP32 in FP16 deployments when its config says `force_upcast` (diffusers'
  default, true for SDXL base, whose VAE overflows in FP16; the "fp16-fix" VAEs say false), as
  the SDXL pipelines upcast it.
Regions run in latent mode (rows per region, with each region's own text_embeds); attention mode's
regional UNet is not exported for SDXL (INVALID_ARG region_mode).
"""

import json

import numpy as np

from families.contracts import BATCH, TensorSpec
from families.sd import StableDiffusion

TIME_ID_FIELDS = ("original_size", "crop_top_left", "target_size")


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipelines = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    text_folders = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    regional_attention = False
    request_fields = TIME_ID_FIELDS

    def text_outputs(self, info) -> tuple:
        return (
            TensorSpec("prompt_embeds", "float32", (BATCH, info.text_length, info.text_hidden)),
            TensorSpec("text_embeds", "float32", (BATCH, info.pooled_dim)),
        )

    def text_inputs(self) -> dict:
        return {"prompt_embeds": "encoder_hidden_states", "text_embeds": "text_embeds"}

    def unet_row_inputs(self, info) -> tuple:
        return (
            TensorSpec("text_embeds", "float32", (BATCH, info.pooled_dim)),
            TensorSpec("time_ids", "float32", (BATCH, 6)),
        )

    def check(self, model_index: dict, path) -> None:
        """Refuses the SDXL pipelines this family does not serve, before their folders are read:
        the refiner (`requires_aesthetics_score`: 5 time ids ending in an aesthetic score, the
        unconditional rows with another score; and only `text_encoder_2`)."""
        missing = [
            folder
            for folder, _ in self.text_folders
            if folder in model_index and not any(model_index[folder] or [None])
        ]
        if model_index.get("requires_aesthetics_score") or missing:
            why = "requires_aesthetics_score" if model_index.get("requires_aesthetics_score") else f"no {missing[0]}"
            raise ValueError(
                f"{path or 'checkpoint'}: an SDXL refiner-style pipeline ({why}) is not served; the SDXL "
                f"family serves base-style checkpoints (two text encoders, 6 time ids)"
            )

    def vae_fp32(self, info) -> bool:
        config = json.loads((info.path / "vae" / "config.json").read_text())
        return bool(config.get("force_upcast", True))  # AutoencoderKL's default

    def row_inputs(self, request, variant) -> dict:
        size = (request.height, request.width)
        sizes = request.family_fields
        ids = [*sizes.get("original_size", size), *sizes.get("crop_top_left", (0, 0)), *sizes.get("target_size", size)]
        return {"time_ids": np.array(ids, np.float32)}

    def torch_module(self, component: str, info):
        from families.sdxl_torch import load_module

        if component == "unet_lora":
            from families.lora import WithLoraInputs

            return WithLoraInputs(load_module("unet", info), self.lora_layers(info)).eval()
        return load_module(component, info)

    def text_lora_layers(self, info) -> dict:
        return {}  # LoRA on SDXL's two text encoders is not served yet (the denoiser's is)
