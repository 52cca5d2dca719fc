"""First-stage training pieces: the edge loss and the decoder-only fine-tune."""

import numpy as np
import torch

from training.autoencoder import build_vae, edge_loss, finetune_decoder, to_tensor
from training.data import eval_scenes, render


def test_edge_loss_is_zero_on_equal_images_and_grows_with_blur():
    x = to_tensor(np.stack([render(s) for s in eval_scenes(4, held_out=False)]))

    def blur(k):
        return torch.nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)

    assert edge_loss(x, x).item() == 0.0
    assert 0 < edge_loss(blur(3), x).item() < edge_loss(blur(5), x).item()


def test_decoder_fine_tune_keeps_the_latent_space():
    torch.manual_seed(0)
    vae = build_vae().eval()
    encoder_before = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder", "post_quant"))}
    decoder_before = vae.decoder.conv_out.weight.clone()
    finetune_decoder(vae, steps=2, batch_size=2, lr=1e-3, seed=0, log=lambda m: None, eval_every=0)
    after = vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder_before.items())
    assert not torch.equal(vae.decoder.conv_out.weight, decoder_before)
    assert all(p.requires_grad for p in vae.parameters())
