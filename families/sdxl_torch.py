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
  original_size + crops_coords_top_left + target_size, 6 numbers per row).
"""
import torch


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
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                          added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                          return_dict=False)[0]


def load_module(name: str, info) -> torch.nn.Module:
    """The torch module of SDXL component `name` (text_encoder: both encoders in one module;
    unet; vae_decoder, vae_encoder as Stable Diffusion's), in eval mode, float32."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from families import sd_torch

    if name == "text_encoder":
        module = SdxlTextEncoders(CLIPTextModel.from_pretrained(info.path / "text_encoder"),
                                  CLIPTextModelWithProjection.from_pretrained(info.path / "text_encoder_2"))
    elif name == "unet":
        module = SdxlUNet(UNet2DConditionModel.from_pretrained(info.path / "unet"))
    else:
        return sd_torch.load_module(name, info)
    return module.float().eval()
