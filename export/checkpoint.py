"""Reading a diffusers-format StableDiffusionPipeline folder: the facts export and serving need."""
from dataclasses import dataclass
import json
from pathlib import Path


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    vocab_size: int
    text_length: int  # token ids per prompt, <bos> and <eos> included
    text_hidden: int
    latent_channels: int
    vae_factor: int  # pixels per latent cell
    vae_scaling_factor: float
    native_size: int  # the image size the UNet was configured for, in pixels
    size_multiple: int  # pixels: image sides must divide by the VAE factor times the UNet's downsampling
    scheduler_config: dict

    @classmethod
    def read(cls, path) -> "CheckpointInfo":
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        text = _json(path / "text_encoder" / "config.json")
        unet = _json(path / "unet" / "config.json")
        vae = _json(path / "vae" / "config.json")
        tokenizer_config = _json(path / "tokenizer" / "tokenizer_config.json")
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        sample_size = unet["sample_size"]
        sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        text_length = int(tokenizer_config.get("model_max_length", text["max_position_embeddings"]))
        return cls(
            path=path,
            vocab_size=int(text["vocab_size"]),
            text_length=min(text_length, int(text["max_position_embeddings"])),
            text_hidden=int(text["hidden_size"]),
            latent_channels=int(unet["in_channels"]),
            vae_factor=vae_factor,
            vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            native_size=int(sample_size) * vae_factor,
            size_multiple=vae_factor * 2 ** (len(unet["down_block_types"]) - 1),
            scheduler_config=_json(path / "scheduler" / "scheduler_config.json"),
        )

    def component_files(self, folder: str):
        """The files a component's export depends on (config and weights)."""
        return sorted(p for p in (self.path / folder).iterdir() if p.is_file())


def _json(path: Path) -> dict:
    return json.loads(path.read_text())
