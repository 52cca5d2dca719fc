"""The UNet of regional prompts' attention mode: every cross-attention layer attends to K text
contexts and mixes their outputs by per-pixel region weights, from the checkpoint's own weights.

For a row with contexts c_1..c_K and weights W_1..W_K (each [h, w] at latent resolution, summing
to 1 at every cell) a cross-attention layer at resolution h/f computes, at every token,
    out = to_out( sum_k W_k(pooled to h/f) * softmax(q k_k^T / sqrt(d)) v_k )
where k_k, v_k are the layer's own projections of c_k. `to_out` is affine and the weights sum to
1, so this equals sum_k W_k * (the layer's usual output for context k): with K = 1 (or one weight
map equal to 1 everywhere) the layer is exactly the checkpoint's. Self-attention, ResNets and
everything else are untouched. This is the Regional Prompter's "Attention" mode with masks as
weights (its rectangles are 0/1 masks; its base ratio is folded into the weights by
serving/core/regions.py).
"""

from typing import Any
import re

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


class SelfAttention(AttnProcessor2_0):
    """diffusers' processor for self-attention layers: region weights reach every attention
    layer through cross_attention_kwargs, and self-attention does not use them."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, region_weights=None
    ):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class RegionalCrossAttention:
    """Cross-attention over K contexts per row, mixed by region weights pooled to this layer's
    resolution (`factor` latent cells per token side)."""

    def __init__(self, factor: int):
        self.factor = factor

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, region_weights=None
    ):
        # hidden_states [B, N, C]; encoder_hidden_states [B, K, L, D]; region_weights [B, K, h, w]
        batch, tokens, _ = hidden_states.shape
        contexts, length = encoder_hidden_states.shape[1], encoder_hidden_states.shape[2]
        query = attn.to_q(hidden_states)
        flat = encoder_hidden_states.flatten(0, 1)  # [B*K, L, D]
        key, value = attn.to_k(flat), attn.to_v(flat)
        inner = key.shape[-1]
        head = inner // attn.heads
        # the same query against each of the row's K contexts
        query = query.view(batch, 1, tokens, attn.heads, head).transpose(2, 3)
        query = query.expand(-1, contexts, -1, -1, -1).flatten(0, 1)  # [B*K, heads, N, head]
        key = key.view(-1, length, attn.heads, head).transpose(1, 2)
        value = value.view(-1, length, attn.heads, head).transpose(1, 2)
        mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        mixed = mixed.transpose(1, 2).reshape(batch, contexts, tokens, inner).transpose(1, 2)  # [B, N, K, C]
        weights = region_weights if self.factor == 1 else F.avg_pool2d(region_weights, self.factor)
        weights = weights.flatten(2).transpose(1, 2).unsqueeze(2)  # [B, N, 1, K], tokens row-major as diffusers
        out = torch.matmul(weights, mixed).squeeze(2)  # a batched matmul: one K-term sum per token, per row
        return attn.to_out[1](attn.to_out[0](out))


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def install_regional_attention(unet) -> int:
    """Puts the regional processors into a diffusers UNet2DConditionModel; returns how many
    cross-attention layers became regional."""
    levels = len(unet.config.block_out_channels) - 1  # downsamplings between the first and last block
    processors: dict[str, Any] = {}
    regional = 0
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if not module.is_cross_attention:
            processors[name] = SelfAttention()
            continue
        if (
            module.spatial_norm is not None
            or module.group_norm is not None
            or module.norm_cross
            or module.residual_connection
            or module.rescale_output_factor != 1.0
            or module.norm_q is not None
        ):
            raise ValueError(f"{name}: this cross-attention layout is not supported by the regional UNet")
        match = _BLOCK.match(name)
        if match is None:
            raise ValueError(f"{name}: cannot tell this cross-attention layer's resolution")
        if match.group(1) == "down_blocks":
            level = int(match.group(2))  # a down block downsamples at its end
        elif match.group(1) == "up_blocks":
            level = levels - int(match.group(2))  # an up block upsamples at its end
        else:
            level = levels
        processors[name] = RegionalCrossAttention(2**level)
        regional += 1
    unet.set_attn_processor(processors)
    return regional


class RegionalUNet(torch.nn.Module):
    """The export contract's `unet_regional`: noise prediction for rows with K contexts each."""

    def __init__(self, unet):
        super().__init__()
        install_regional_attention(unet)
        self.model = unet

    def forward(self, sample, timestep, encoder_hidden_states, region_weights):
        return self.model(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            cross_attention_kwargs={"region_weights": region_weights},
            return_dict=False,
        )[0]
