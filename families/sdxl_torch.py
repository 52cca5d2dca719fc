"""torch modules with the inputs and outputs of SDXL's export contracts (StableDiffusionXLPipeline).

The SDXL family's torch side (families/sdxl.py declares its contracts). Each wrapper mirrors one piece of diffusers 0.42.1's StableDiffusionXLPipeline, so an ONNX graph
exported from it, or the torch runner calling it, computes what the pipeline computes:

- text: `encode_prompt` runs both encoders with `output_hidden_states=True`, takes
  `hidden_states[-2]` (the penultimate layer, before the final layer norm) of each and
  concatenates them on the last axis ([B, L, D1 + D2], the UNet's cross-attention width); the
  pooled `text_embeds` are output[0] of `text_encoder_2` (CLIPTextModelWithProjection: the final
  hidden state at the first <eos>, final layer norm, then the projection) — the first encoder's
  pooled output is not used;
- the empty-prompt rule (`force_zeros_for_empty_prompt` and no negative prompt: the
  unconditional row's hidden states AND pooled embeds are zeros, no encoder call) is the caller's;
- the UNet: `unet(latents, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs={"text_embeds":
  add_text_embeds, "time_ids": add_time_ids})`, every input one row per image (time ids =
  original_size + crops_coords_top_left + target_size, 6 numbers per row);
- the VAE: as Stable Diffusion's (latents / scaling_factor), unless its config has per-channel
  `latents_mean` and `latents_std` (SDXL derivatives such as Playground v2.5; not SDXL base): then
  the pipeline decodes `latents * latents_std / scaling_factor + latents_mean` and
  StableDiffusionXLImg2ImgPipeline encodes `(z - latents_mean) * scaling_factor / latents_std`,
  which the encoder contract's (mean, std) carry (StableDiffusionXLInpaintPipeline's own encoding
  ignores the statistics, a diffusers inconsistency; the served inpainting uses img2img's).
"""

import torch

from families.sd_torch import VaeDecoder, VaeEncoder


class SdxlTextEncoder(torch.nn.Module):
    """`text_encoder` (CLIPTextModel) as StableDiffusionXLPipeline.encode_prompt reads it:
    input_ids [B, L] (int64) -> hidden_states[-2] [B, L, D1]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, output_hidden_states=True).hidden_states[-2]


class SdxlTextEncoderWithProjection(torch.nn.Module):
    """`text_encoder_2` (CLIPTextModelWithProjection) as StableDiffusionXLPipeline.encode_prompt
    reads it: input_ids [B, L] (int64) -> (hidden_states[-2] [B, L, D2], text_embeds [B, P]); the
    pooled text_embeds are the model's output[0] (projected), the UNet's `text_embeds`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class SdxlTextEncoders(torch.nn.Module):
    """Both encoders in one call, as StableDiffusionXLPipeline.encode_prompt combines them when the
    two prompts are the same text (prompt_2 = prompt): input_ids [B, L] for `tokenizer` and
    input_ids_2 [B, L] for `tokenizer_2` -> (prompt_embeds [B, L, D1 + D2], pooled [B, P])."""

    def __init__(self, text_encoder, text_encoder_2):
        super().__init__()
        self.first = SdxlTextEncoder(text_encoder)
        self.second = SdxlTextEncoderWithProjection(text_encoder_2)

    def forward(self, input_ids, input_ids_2):
        hidden_2, pooled = self.second(input_ids_2)
        return torch.cat([self.first(input_ids), hidden_2], dim=-1), pooled


class SdxlUNet(torch.nn.Module):
    """The SDXL UNet (addition_embed_type "text_time") as StableDiffusionXLPipeline's denoising loop
    calls it: sample [B, C, h, w], timestep [B] (FP32, one per row, may be fractional),
    encoder_hidden_states [B, L, D1 + D2], text_embeds [B, P], time_ids [B, 6] -> noise_pred
    [B, 4, h, w] (C = 4, or 9 for the inpainting UNet: latents, mask, masked-image latents)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.model(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]


def latent_statistics(vae):
    """The VAE's per-channel latents_mean and latents_std as [1, C, 1, 1] tensors, or (None, None)
    when its config lacks either (diffusers then uses the scaling factor alone)."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None, None
    return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


class SdxlVaeDecoder(VaeDecoder):
    """latents [N, C, h, w] (diffusion units) -> images [N, H, W, 3] in [0, 1], as
    StableDiffusionXLPipeline decodes them: with the VAE's latent statistics where it has them."""

    def __init__(self, vae, scaling_factor):
        super().__init__(vae, scaling_factor)
        mean, std = latent_statistics(vae)
        self.register_buffer("latents_mean", mean)
        self.register_buffer("latents_std", std)

    def forward(self, latents):
        if self.latents_mean is None:
            return super().forward(latents)
        latents = latents * self.latents_std / self.scaling_factor + self.latents_mean
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    def encoder(self) -> "SdxlVaeEncoder":
        return SdxlVaeEncoder(self.vae, self.scaling_factor)


class SdxlVaeEncoder(VaeEncoder):
    """images [N, H, W, 3] in [0, 1] -> the posterior's (mean, std) in diffusion units, as
    StableDiffusionXLImg2ImgPipeline scales its sample z: (z - latents_mean) * scaling_factor /
    latents_std where the VAE has latent statistics, else z * scaling_factor."""

    def __init__(self, vae, scaling_factor):
        super().__init__(vae, scaling_factor)
        mean, std = latent_statistics(vae)
        self.register_buffer("latents_mean", mean)
        self.register_buffer("latents_std", std)

    def forward(self, images):
        if self.latents_mean is None:
            return super().forward(images)
        posterior = self.vae.encode(images.permute(0, 3, 1, 2) * 2 - 1, return_dict=False)[0]
        return (
            (posterior.mean - self.latents_mean) * self.scaling_factor / self.latents_std,
            posterior.std * self.scaling_factor / self.latents_std,
        )


def load_module(name: str, info) -> torch.nn.Module:
    """The torch module of SDXL component `name` (text_encoder: both encoders in one module;
    unet; vae_decoder, vae_encoder with the VAE's latent statistics), in eval mode, float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from families import sd_torch

    module: torch.nn.Module
    if name == "text_encoder":
        module = SdxlTextEncoders(
            CLIPTextModel.from_pretrained(info.path / "text_encoder"),
            CLIPTextModelWithProjection.from_pretrained(info.path / "text_encoder_2"),
        )
    elif name == "unet":
        module = SdxlUNet(UNet2DConditionModel.from_pretrained(info.path / "unet"))
    elif name in ("vae_decoder", "vae_encoder"):
        wrapper = SdxlVaeDecoder if name == "vae_decoder" else SdxlVaeEncoder
        module = wrapper(AutoencoderKL.from_pretrained(info.path / "vae"), info.vae_scaling_factor)
    else:
        return sd_torch.load_module(name, info)
    return module.float().eval()
