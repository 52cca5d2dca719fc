"""Reading a diffusers-format pipeline folder: the facts export and serving need.

The UNet's input layout says which kind of checkpoint it is (`layout`):
- "base": text-to-image, the UNet takes the latents alone (in_channels = latent channels);
- "inpaint": StableDiffusionInpaintPipeline's UNet takes cat(latents, mask, masked-image latents)
  (in_channels = 2 x latent channels + 1);
- "upscale": StableDiffusionUpscalePipeline's (x4 upscaler) takes cat(latents, noised low-res RGB
  image) (in_channels = latent channels + 3) and the noise level as class labels.
"""
from dataclasses import dataclass
import json
from pathlib import Path

LAYOUTS = ("base", "inpaint", "upscale")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    vocab_size: int
    text_length: int  # token ids per prompt, <bos> and <eos> included
    text_hidden: int
    latent_channels: int  # what the VAE encodes to and the UNet predicts
    unet_in_channels: int  # latents plus any concatenated conditioning channels
    layout: str  # one of LAYOUTS
    vae_factor: int  # pixels per latent cell
    vae_scaling_factor: float
    native_size: int  # the image size the UNet was configured for, in pixels
    size_multiple: int  # pixels: image sides must divide by the VAE factor times the UNet's downsampling
    scheduler_config: dict
    low_res_scheduler_config: dict | None = None  # upscale: the schedule that noises the low-res image
    max_noise_level: int | None = None  # upscale: largest noise_level (class label) accepted

    @classmethod
    def read(cls, path) -> "CheckpointInfo":
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        index = _json(path / "model_index.json")
        text = _json(path / "text_encoder" / "config.json")
        unet = _json(path / "unet" / "config.json")
        vae = _json(path / "vae" / "config.json")
        tokenizer_config = _json(path / "tokenizer" / "tokenizer_config.json")
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        sample_size = unet["sample_size"]
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        text_length = int(tokenizer_config.get("model_max_length", text["max_position_embeddings"]))
        latent_channels = int(unet.get("out_channels", unet["in_channels"]))
        layout = unet_layout(unet, latent_channels)
        upscale = layout == "upscale"
        return cls(
            path=path,
            vocab_size=int(text["vocab_size"]),
            text_length=min(text_length, int(text["max_position_embeddings"])),
            text_hidden=int(text["hidden_size"]),
            latent_channels=latent_channels,
            unet_in_channels=int(unet["in_channels"]),
            layout=layout,
            vae_factor=vae_factor,
            vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            native_size=int(sample_size) * vae_factor,
            size_multiple=vae_factor * 2 ** (len(unet["down_block_types"]) - 1),
            scheduler_config=_json(path / "scheduler" / "scheduler_config.json"),
            low_res_scheduler_config=_json(path / "low_res_scheduler" / "scheduler_config.json") if upscale else None,
            max_noise_level=int(index.get("max_noise_level", 350)) if upscale else None,
        )

    def component_files(self, folder: str):
        """The files a component's export depends on (config and weights)."""
        return sorted(p for p in (self.path / folder).iterdir() if p.is_file())


def unet_layout(unet_config: dict, latent_channels: int) -> str:
    channels = int(unet_config["in_channels"])
    if channels == latent_channels:
        return "base"
    if channels == 2 * latent_channels + 1:
        return "inpaint"
    if channels == latent_channels + 3 and unet_config.get("num_class_embeds"):
        return "upscale"
    raise ValueError(
        f"unet in_channels={channels} with {latent_channels} latent channels is none of the layouts served: "
        f"{latent_channels} (text-to-image), {2 * latent_channels + 1} (inpainting), "
        f"{latent_channels + 3} with class embeddings (x4 upscaler)"
    )


def _json(path: Path) -> dict:
    return json.loads(path.read_text())
