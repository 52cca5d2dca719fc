"""The regional UNet's torch processor against the checkpoint's own UNet (its ONNX export is
checked against this processor in test_export.py)."""

import torch
from diffusers import UNet2DConditionModel

from families.regional_unet import RegionalCrossAttention, RegionalUNet


def test_one_context_or_one_hot_weights_give_the_checkpoints_unet_exactly(tiny_checkpoint):
    base = UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet").eval()
    regional = RegionalUNet(UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")).eval()
    processors = regional.model.attn_processors.values()
    # cross-attention at 8x8 (down block 0, up block 1) and 4x4 (mid block), pooled 1x and 2x
    assert sorted(p.factor for p in processors if isinstance(p, RegionalCrossAttention)) == [1, 1, 1, 2]
    torch.manual_seed(0)
    sample, t = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 3])
    contexts = torch.randn(3, 2, 16, 32)
    with torch.no_grad():
        second = base(sample, t, encoder_hidden_states=contexts[:, 1]).sample
        assert torch.equal(
            regional(sample, t, contexts[:, :1], torch.ones(3, 1, 8, 8)),
            base(sample, t, encoder_hidden_states=contexts[:, 0]).sample,
        )
        one_hot = torch.zeros(3, 2, 8, 8)
        one_hot[:, 1] = 1
        assert torch.equal(regional(sample, t, contexts, one_hot), second)
        halves = torch.zeros(3, 2, 8, 8)
        halves[:, 0, :, :4], halves[:, 1, :, 4:] = 1, 1
        split = regional(sample, t, contexts, halves)
    assert (split - second).abs().max() > 1e-3  # the left half follows the other context
