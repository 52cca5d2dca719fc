"""The Flux family (FluxPipeline, FluxImg2ImgPipeline: FLUX.1-dev and -schnell class flow-matching
transformers), as diffusers 0.42.1 runs it, in what differs from the UNet families:
- text: CLIP's pooled output (`pooled_projections`) and T5's last hidden states (the context,
  `encoder_hidden_states`, max_sequence_length tokens: the T5 tokenizer's model_max_length, 512
  for FLUX.1); prompts longer than CLIP's 77 tokens are truncated for CLIP as FluxPipeline does
  (only T5's length refuses a prompt); no empty-prompt rule;
- the denoiser is FluxTransformer2DModel over 2x2-packed latent tokens with position ids; the
  exported component (families/flux_torch.py) takes the unpacked latents [B, C, h, w] and packs,
  builds img_ids/txt_ids and unpacks inside, so the engine, the samplers and a seed's noise (the
  PCG64 draw in the unpacked shape) are the same as for every family. Its timestep input is the
  sampler's sigma x 1000 (the wrapper divides by 1000 as FluxPipeline does);
- guidance: a guidance-distilled checkpoint (`guidance_embeds`, FLUX.1-dev) takes
  `guidance_scale` as a per-row input, one row per job; `true_cfg_scale` > 1 with a negative
  prompt adds the negative's row and combines neg + s (pos - neg) (FluxPipeline's true CFG);
  schnell (no guidance input) ignores guidance_scale;
- the schedule: flow_match_euler over sigmas linspace(1, 1/steps, steps) (FluxPipeline passes
  these), shifted by mu = calculate_shift(image tokens) when the scheduler shifts dynamically;
  image-to-image and inpainting keep steps - int(steps - steps x strength) of them (SD3's
  get_timesteps, which rounds up where SD's rounds down);
- the VAE's shift factor (latents = (VAE latents - shift) x scaling);
- the native size is FluxPipeline's default (128 latent cells a side x the VAE factor); sides
  are multiples of twice the VAE factor (the 2x2 packing).
Regional prompts are not served for Flux (INVALID_ARG region_prompts).
"""

from families.contracts import BATCH, TensorSpec
from families.sd import StableDiffusion

DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size, latent cells


class Flux(StableDiffusion):
    name = "flux"
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    denoiser_folder = "transformer"
    text_folders = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
    regional_attention = False
    sdpa_processor = False  # the torch runner gives the denoiser diffusers' AttnProcessor2_0
    regions = False
    lora = False  # not yet: the transformer's layers are not adapted
    request_fields = ("true_cfg_scale",)
    guidance = "true_cfg"  # one row; two with true_cfg_scale > 1 and a negative prompt
    default_guidance_scale = 3.5  # FluxPipeline's

    def denoiser_facts(self, config: dict, vae_factor: int) -> dict:
        latent_channels = int(config["in_channels"]) // 4  # 2x2 packing
        return {
            "latent_channels": latent_channels,
            "unet_in_channels": latent_channels,
            "layout": "base",
            "native_size": DEFAULT_SAMPLE_SIZE * vae_factor,
            "size_multiple": 2 * vae_factor,
            "distilled_guidance": bool(config.get("guidance_embeds", False)),
        }

    def text_facts(self, encoders: tuple) -> dict:
        clip, t5 = encoders
        return {"text_length": t5.length, "text_hidden": t5.hidden, "pooled_dim": clip.hidden}

    def checked_inputs(self, info) -> tuple:
        return ("input_ids_2",)  # CLIP truncates (FluxPipeline warns and goes on); T5's length is the limit

    def scheduler_config(self, config: dict) -> dict:
        # FluxPipeline passes its own sigmas, linspace(1, 1/steps, steps), not the scheduler's default
        return {**config, "sigmas_from_steps": True}

    def shift_mu(self, request, variant) -> float | None:
        config = variant.scheduler_config
        if not config.get("use_dynamic_shifting"):
            return None
        tokens = (request.height // variant.vae_factor // 2) * (request.width // variant.vae_factor // 2)
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (high - low) / (top - base)  # diffusers' calculate_shift
        return tokens * slope + (low - slope * base)

    def kept_steps(self, steps: int, strength: float) -> int:
        # FluxImg2ImgPipeline's and FluxInpaintPipeline's get_timesteps (SD3's) skip the first
        # int(steps - steps x strength): the kept steps round up (10 x 0.65 keeps 7, SD's rule 6)
        return steps - int(max(steps - steps * strength, 0))

    def text_outputs(self, info) -> tuple:
        return (
            TensorSpec("prompt_embeds", "float32", (BATCH, info.text_length, info.text_hidden)),
            TensorSpec("pooled_projections", "float32", (BATCH, info.pooled_dim)),
        )

    def text_inputs(self) -> dict:
        return {"prompt_embeds": "encoder_hidden_states", "pooled_projections": "pooled_projections"}

    def unet_row_inputs(self, info) -> tuple:
        guidance = (TensorSpec("guidance", "float32", (BATCH,)),) if info.distilled_guidance else ()
        return (TensorSpec("pooled_projections", "float32", (BATCH, info.pooled_dim)), *guidance)

    def dynamo_export(self, component: str) -> bool:
        # the TorchScript exporter cannot export the transformer's RMSNorm (aten::rms_norm)
        return component == "unet"

    def torch_module(self, component: str, info):
        from families.flux_torch import load_module

        return load_module(component, info)
