"""The Stable Diffusion 1.x/2.x family (StableDiffusionPipeline and its inpainting and x4-upscaler
kin): one CLIP text encoder whose final hidden states are the UNet's context, a UNet taking
(latent, timestep, context) and, for the x4 upscaler, the noise level as class labels.

A family declares what the layers above it read instead of branching on names (the other
families subclass this one and override what differs; docs/extending.md):
- `pipelines`: the model_index.json `_class_name`s it serves;
- `denoiser_folder`, `denoiser_facts`: where the denoiser is and what its config says (latent
  channels, layout, native size, size multiple);
- `text_folders`, `text_facts`: (text encoder, tokenizer) checkpoint folders, and the denoiser's
  text context (length, width) and pooled input width they make;
- `scheduler_config`: the scheduler config the samplers read (the pipeline's own schedule rules);
- `guidance`: "cfg" (classifier-free guidance by guidance_scale: a conditional and an
  unconditional row) or "true_cfg" (one row; a negative prompt's row only with true_cfg_scale > 1;
  guidance_scale is the model's `guidance` input where the checkpoint is guidance-distilled);
- `checked_inputs`: the token-id inputs whose length refuses a prompt (others truncate);
- `shift_mu`: a job's resolution-dependent schedule shift (flow matching), or None;
- `kept_steps`: how many of a run's steps image-to-image and inpainting denoise at a strength
  (the pipeline's get_timesteps);
- `token_inputs` / `text_outputs` / `text_inputs`: the exported text encoder's contract and which
  denoiser input each of its outputs feeds;
- `unet_row_inputs`: the UNet's inputs beyond (sample, timestep, encoder_hidden_states), one row
  per UNet row, and `row_inputs` their values for one request;
- `request_fields`: the request fields only this family reads (others' are refused);
- `regional_attention`: whether regions' attention mode (the regional UNet) is exported;
- `vae_fp32`: whether the VAE must run in FP32 where the rest runs in FP16;
- `check`: refuses, by its model_index.json, a pipeline of its classes it cannot serve;
- `torch_module`: the torch wrapper of each component, shared by export and the torch runner.
Nothing here imports torch at module level: the engine reads these declarations without it.
"""

from families.checkpoint import unet_layout
from families.contracts import BATCH, TensorSpec, token_input_names


class StableDiffusion:
    name = "sd"
    pipelines: tuple[str, ...] = (
        "StableDiffusionPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionUpscalePipeline",
        "StableDiffusionImg2ImgPipeline",
    )
    denoiser_folder = "unet"
    text_folders: tuple[tuple[str, str], ...] = (("text_encoder", "tokenizer"),)
    regional_attention = True
    sdpa_processor = True  # the torch runner gives the denoiser diffusers' AttnProcessor2_0
    regions = True  # regional prompts in latent mode
    lora = True  # LoRA adapters on the denoiser (families/lora.py)
    request_fields: tuple[str, ...] = ()
    guidance = "cfg"
    default_guidance_scale = 5.0

    def denoiser_facts(self, config: dict, vae_factor: int) -> dict:
        sample_size = config["sample_size"]
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        latent_channels = int(config.get("out_channels", config["in_channels"]))
        return {
            "latent_channels": latent_channels,
            "unet_in_channels": int(config["in_channels"]),
            "layout": unet_layout(config, latent_channels),
            "native_size": int(sample_size) * vae_factor,
            "size_multiple": vae_factor * 2 ** (len(config["down_block_types"]) - 1),
        }

    def text_facts(self, encoders: tuple) -> dict:
        """The context is every encoder's hidden states side by side (one length for all); the
        pooled input, where there is one, is the projected encoder's."""
        return {
            "text_length": min(e.length for e in encoders),
            "text_hidden": sum(e.hidden for e in encoders),
            "pooled_dim": next((e.projection for e in encoders if e.projection), None),
        }

    def checked_inputs(self, info) -> tuple:
        return self.token_inputs(info)

    def scheduler_config(self, config: dict) -> dict:
        return config

    def shift_mu(self, request, variant) -> float | None:
        return None

    def kept_steps(self, steps: int, strength: float) -> int:
        """The last int(steps x strength) steps (StableDiffusionImg2ImgPipeline's get_timesteps)."""
        return min(int(steps * strength), steps)

    def token_inputs(self, info) -> tuple:
        return token_input_names(len(info.text_encoders))

    def text_outputs(self, info) -> tuple:
        # the final (layer-normed) hidden states, as StableDiffusionPipeline conditions on
        return (TensorSpec("last_hidden_state", "float32", (BATCH, info.text_length, info.text_hidden)),)

    def text_inputs(self) -> dict:
        """The text encoder's outputs -> the denoiser inputs they feed (per text)."""
        return {"last_hidden_state": "encoder_hidden_states"}

    def unet_row_inputs(self, info) -> tuple:
        # the x4 upscaler's noise level, one per row
        return (TensorSpec("class_labels", "int64", (BATCH,)),) if info.layout == "upscale" else ()

    def check(self, model_index: dict, path) -> None:
        """Refuses a pipeline of this family's classes that it cannot serve (ValueError naming why)."""

    def vae_fp32(self, info) -> bool:
        """Whether the VAE must stay FP32 in an FP16 deployment (StableDiffusionPipeline never
        upcasts its VAE)."""
        return False

    def row_inputs(self, request, variant) -> dict:
        """A request's own per-row denoiser inputs (one value per row of its job), beyond its
        text's and its image conditioning's."""
        return {}

    def lora_layers(self, info) -> dict:
        """{layer: (in, out)} of the denoiser's layers a LoRA may target (families/lora.py), read
        from an empty (meta-device) copy of the denoiser: nothing is loaded."""
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel

        from families.lora import lora_layers

        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(info.path / "unet"))
        return lora_layers(unet)

    def text_lora_layers(self, info) -> dict:
        """{layer: (in, out)} of the text encoder's layers a LoRA may target (families/lora.py)."""
        from accelerate import init_empty_weights
        from transformers import CLIPTextConfig, CLIPTextModel

        from families.lora import text_lora_layers

        with init_empty_weights():
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(info.path / "text_encoder"))
        return text_lora_layers(text)

    def dynamo_export(self, component: str) -> bool:
        """Whether the component needs the torch.export-based ONNX exporter."""
        return False

    def torch_module(self, component: str, info):
        from families.sd_torch import load_module

        if component in ("unet_lora", "text_encoder_lora"):
            from families.lora import WithLoraInputs

            base = component.removesuffix("_lora")
            layers = self.lora_layers(info) if base == "unet" else self.text_lora_layers(info)
            return WithLoraInputs(load_module(base, info), layers).eval()
        return load_module(component, info)
