"""torch modules with exactly the inputs and outputs of each export contract."""

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from families.checkpoint import CheckpointInfo


class TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        # the final (layer-normed) hidden states, as StableDiffusionPipeline conditions on
        return self.model(input_ids=input_ids).last_hidden_state


class UNet(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None):
        # class_labels: the x4 upscaler's noise level per row; other layouts have no such input
        return self.model(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels, return_dict=False
        )[0]


class VaeDecoder(torch.nn.Module):
    """Diffusion latents -> NHWC images in [0, 1]: latents / scaling + shift into the VAE (the shift
    is Flux's; 0 for SD's VAE, where the addition is left out of the graph)."""

    def __init__(self, vae, scaling_factor, shift_factor=0.0):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def forward(self, latents):
        latents = latents / self.scaling_factor
        if self.shift_factor:
            latents = latents + self.shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)

    def encoder(self) -> "VaeEncoder":
        """The matching encoder on the same VAE weights (the torch runner loads them once)."""
        return VaeEncoder(self.vae, self.scaling_factor, self.shift_factor)


class VaeEncoder(torch.nn.Module):
    """NHWC images in [0, 1] -> the posterior's mean and standard deviation in diffusion units:
    (mean - shift) x scaling and std x scaling, so mean + std x noise is what the pipelines'
    (sample - shift) x scaling is for the same noise."""

    def __init__(self, vae, scaling_factor, shift_factor=0.0):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    def forward(self, images):
        posterior = self.vae.encode(images.permute(0, 3, 1, 2) * 2 - 1, return_dict=False)[0]
        mean = posterior.mean - self.shift_factor if self.shift_factor else posterior.mean
        return mean * self.scaling_factor, posterior.std * self.scaling_factor


def load_module(name: str, info: CheckpointInfo) -> torch.nn.Module:
    """The torch module of component `name` (text_encoder, unet, unet_regional, vae_decoder,
    vae_encoder), in eval mode, float32."""
    module: torch.nn.Module
    if name == "text_encoder":
        module = TextEncoder(CLIPTextModel.from_pretrained(info.path / "text_encoder"))
    elif name == "unet":
        module = UNet(UNet2DConditionModel.from_pretrained(info.path / "unet"))
    elif name == "unet_regional":
        from families.regional_unet import RegionalUNet

        module = RegionalUNet(UNet2DConditionModel.from_pretrained(info.path / "unet"))
    elif name in ("vae_decoder", "vae_encoder"):
        vae = AutoencoderKL.from_pretrained(info.path / "vae")
        wrapper = VaeDecoder if name == "vae_decoder" else VaeEncoder
        module = wrapper(vae, info.vae_scaling_factor, info.vae_shift_factor)
    else:
        raise KeyError(f"unknown component {name!r}")
    return module.float().eval()
