"""torch modules with the inputs and outputs of the Flux family's export contracts (families/flux.py),
each mirroring a piece of diffusers 0.42.1's FluxPipeline.

- text: `_get_clip_prompt_embeds` (CLIPTextModel's pooler_output) and `_get_t5_prompt_embeds`
  (T5EncoderModel's last hidden state) in one module: input_ids [B, 77] for CLIP and input_ids_2
  [B, L] for T5 -> (prompt_embeds [B, L, D_t5], pooled_projections [B, D_clip]);
- the denoiser: `_pack_latents` (2x2 patches of the [B, C, h, w] latents into [B, h/2 * w/2, 4C]
  tokens), `_prepare_latent_image_ids` (0, row, column per token) and zero txt_ids, the
  transformer called with timestep / 1000 (FluxPipeline's), then `_unpack_latents` back to
  [B, C, h, w]. Packing is a permutation and the flow-matching update is elementwise, so
  sampling the unpacked latents gives what FluxPipeline gives on the packed ones.
"""

import torch


class FluxTextEncoders(torch.nn.Module):
    def __init__(self, clip, t5):
        super().__init__()
        self.clip = clip
        self.t5 = t5

    def forward(self, input_ids, input_ids_2):
        pooled = self.clip(input_ids=input_ids, output_hidden_states=False).pooler_output
        return self.t5(input_ids_2, output_hidden_states=False)[0], pooled


class FluxDenoiser(torch.nn.Module):
    """sample [B, C, h, w], timestep [B] (sigma x 1000), encoder_hidden_states [B, L, D],
    pooled_projections [B, P], guidance [B] (guidance-distilled checkpoints only) -> [B, C, h, w]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, guidance=None):
        batch, channels, height, width = sample.shape
        tokens = sample.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(batch, (height // 2) * (width // 2), channels * 4)
        rows = torch.arange(height // 2, dtype=sample.dtype, device=sample.device)
        columns = torch.arange(width // 2, dtype=sample.dtype, device=sample.device)
        img_ids = torch.stack(
            [
                torch.zeros(height // 2, width // 2, dtype=sample.dtype, device=sample.device),
                rows[:, None].expand(height // 2, width // 2),
                columns[None, :].expand(height // 2, width // 2),
            ],
            dim=-1,
        ).reshape(-1, 3)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, dtype=sample.dtype, device=sample.device)
        out = self.model(
            hidden_states=tokens,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        out = out.reshape(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)


def load_module(name: str, info) -> torch.nn.Module:
    """The torch module of Flux component `name` (text_encoder: CLIP and T5 in one module; unet:
    the transformer; vae_decoder, vae_encoder as Stable Diffusion's, with the shift factor), in
    eval mode, float32."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from families import sd_torch

    module: torch.nn.Module
    if name == "text_encoder":
        module = FluxTextEncoders(
            CLIPTextModel.from_pretrained(info.path / "text_encoder"),
            T5EncoderModel.from_pretrained(info.path / "text_encoder_2"),
        )
    elif name == "unet":
        module = FluxDenoiser(FluxTransformer2DModel.from_pretrained(info.path / "transformer"))
    else:
        return sd_torch.load_module(name, info)
    return module.float().eval()
