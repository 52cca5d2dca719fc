"""Reading a diffusers-format pipeline folder: the facts export and serving need.

The pipeline class in `model_index.json` names the family (families/__init__.py). Within a UNet
family the UNet's input layout says which kind of checkpoint it is (`layout`):
- "base": text-to-image, the UNet takes the latents alone (in_channels = latent channels);
- "inpaint": an inpainting pipeline's UNet takes cat(latents, mask, masked-image latents)
  (in_channels = 2 x latent channels + 1);
- "upscale": StableDiffusionUpscalePipeline's (x4 upscaler) takes cat(latents, noised low-res RGB
  image) (in_channels = latent channels + 3) and the noise level as class labels.
"""

from dataclasses import dataclass
import json
from pathlib import Path

LAYOUTS = ("base", "inpaint", "upscale")


@dataclass(frozen=True)
class TextEncoderInfo:
    """One text encoder with its tokenizer (SDXL and Flux have two, read into one exported component)."""

    folder: str  # text_encoder, text_encoder_2
    tokenizer: str  # tokenizer, tokenizer_2
    vocab_size: int
    hidden: int  # width of its hidden states
    length: int  # token ids per prompt it reads, special tokens included
    projection: int | None = None  # width of its projected pooled output (CLIPTextModelWithProjection)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    family: str  # families/__init__.py FAMILIES
    text_encoders: tuple  # TextEncoderInfo, in the family's order (text_encoder, text_encoder_2)
    text_length: int  # tokens of the denoiser's text context (sequence length)
    text_hidden: int  # width of the denoiser's text context
    pooled_dim: int | None  # width of the pooled text input (SDXL's text_embeds, Flux's pooled_projections)
    latent_channels: int  # what the VAE encodes to and the UNet predicts
    unet_in_channels: int  # latents plus any concatenated conditioning channels
    layout: str  # one of LAYOUTS
    vae_factor: int  # pixels per latent cell
    vae_scaling_factor: float
    vae_shift_factor: float  # latents = (VAE latents - shift) x scaling (Flux's VAE; 0 for SD's)
    native_size: int  # the image size the UNet was configured for, in pixels
    size_multiple: int  # pixels: image sides must divide by the VAE factor times the UNet's downsampling
    scheduler_config: dict
    low_res_scheduler_config: dict | None = None  # upscale: the schedule that noises the low-res image
    max_noise_level: int | None = None  # upscale: largest noise_level (class label) accepted
    # SDXL's force_zeros_for_empty_prompt: without a negative prompt the unconditional row's
    # embeddings are zeros, not the encoding of ""
    zero_empty_negative: bool = False
    distilled_guidance: bool = False  # the denoiser takes guidance as an input (FLUX.1-dev's guidance_embeds)

    @property
    def vocab_size(self) -> int:
        return self.text_encoders[0].vocab_size

    @classmethod
    def read(cls, path) -> "CheckpointInfo":
        from families import family_of  # the registry imports the family modules, which import this one

        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        index = _json(path / "model_index.json")
        family = family_of(index, path)
        vae = _json(path / "vae" / "config.json")
        encoders = tuple(_text_encoder(path, folder, tokenizer) for folder, tokenizer in family.text_folders)
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        denoiser = family.denoiser_facts(_json(path / family.denoiser_folder / "config.json"), vae_factor)
        upscale = denoiser["layout"] == "upscale"
        return cls(
            path=path,
            family=family.name,
            text_encoders=encoders,
            **family.text_facts(encoders),
            **denoiser,
            vae_factor=vae_factor,
            vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            vae_shift_factor=float(vae.get("shift_factor") or 0.0),
            scheduler_config=family.scheduler_config(_json(path / "scheduler" / "scheduler_config.json")),
            low_res_scheduler_config=_json(path / "low_res_scheduler" / "scheduler_config.json") if upscale else None,
            max_noise_level=int(index.get("max_noise_level", 350)) if upscale else None,
            zero_empty_negative=bool(index.get("force_zeros_for_empty_prompt", False)),
        )

    def component_files(self, folder: str):
        """The files a component's export depends on (config and weights)."""
        return sorted(p for p in (self.path / folder).iterdir() if p.is_file())


def _text_encoder(path: Path, folder: str, tokenizer: str) -> TextEncoderInfo:
    config = _json(path / folder / "config.json")
    length = int(_json(path / tokenizer / "tokenizer_config.json").get("model_max_length", 512))
    if "max_position_embeddings" in config:  # CLIP's learned positions bound it; T5's relative ones do not
        length = min(length, int(config["max_position_embeddings"]))
    projected = "WithProjection" in str(config.get("architectures", "")) and "projection_dim" in config
    return TextEncoderInfo(
        folder,
        tokenizer,
        int(config["vocab_size"]),
        int(config.get("hidden_size", config.get("d_model", 0))),
        length,
        int(config["projection_dim"]) if projected else None,
    )


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
