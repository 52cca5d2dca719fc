"""Which runner serves each component, from the pipeline's config.pbtxt parameters.

  unet      inprocess: ONNX Runtime in the pipeline's process (unet/1/model.onnx)
            bls:       the `unet` Triton model, one BLS call per step (a TensorRT or ONNX Runtime
                       backend model in the NGC image)
            torch:     the checkpoint's UNet with torch in the pipeline's process (CUDA graphs on GPU)
  text_vae  bls:       the `text_encoder`, `vae_decoder`, `vae_encoder` Triton models
            torch:     the checkpoint's text encoder and VAE with torch in the pipeline's process
  torch_buckets, torch_compile, cuda_graphs: TorchOptions of the torch runner.

The torch runner reads the checkpoint copy `ldm export` puts in pipeline/1/checkpoint, and runs
on the device of the pipeline's Triton instance (KIND_GPU: cuda:<device id>; KIND_CPU: cpu).
"""
from dataclasses import dataclass
from pathlib import Path

from serving.core.request import config_parameter
from serving.models.torch_options import TorchOptions, parse_buckets

UNET_RUNNERS = ("inprocess", "bls", "torch")
TEXT_VAE_RUNNERS = ("bls", "torch")
CHECKPOINT_COPY = "checkpoint"  # inside the pipeline's version folder


@dataclass(frozen=True)
class RunnerChoice:
    unet: str = "bls"
    text_vae: str = "bls"
    torch: TorchOptions = TorchOptions()

    @classmethod
    def from_parameters(cls, params: dict, device: str) -> "RunnerChoice":
        unet = params.get("unet", "bls")
        text_vae = params.get("text_vae", "bls")
        if unet not in UNET_RUNNERS:
            raise ValueError(f"pipeline config.pbtxt parameter unet={unet!r} must be one of {UNET_RUNNERS}")
        if text_vae not in TEXT_VAE_RUNNERS:
            raise ValueError(f"pipeline config.pbtxt parameter text_vae={text_vae!r} must be one of {TEXT_VAE_RUNNERS}")
        buckets = params.get("torch_buckets", "")
        options = TorchOptions(
            device=device,
            buckets=parse_buckets(buckets) if buckets else None,
            max_rows=config_parameter(params, "max_rows", int, 32),
            cuda_graphs=_flag(params, "cuda_graphs", True),
            compile=_flag(params, "torch_compile", False),
        )
        return cls(unet, text_vae, options)

    @property
    def torch_components(self) -> tuple:
        return (("text_encoder", "vae") if self.text_vae == "torch" else ()) + (("unet",) if self.unet == "torch" else ())


def _flag(params: dict, name: str, default: bool) -> bool:
    value = params.get(name, "true" if default else "false").lower()
    if value not in ("true", "false"):
        raise ValueError(f"pipeline config.pbtxt parameter {name}={value!r} must be true or false")
    return value == "true"


class ModelCalls:
    """The engine's models: the text encoder and VAE from one provider, the UNet from another.
    regional: the regional UNet (regions' attention mode), or None where the export has none.
    row_cap: the UNet rows per call the UNet's device can serve, when its runner knows it."""

    def __init__(self, text_vae, unet, regional=None, row_cap=None):
        self.text_vae = text_vae
        self._unet = unet
        self._regional = regional
        self.row_cap = row_cap

    def encode_text(self, input_ids, **more_ids):
        """Token ids by input name (input_ids, and SDXL's input_ids_2) -> the text encoder's outputs by name."""
        return self.text_vae.encode_text(input_ids, **more_ids)

    def unet(self, sample, timestep, encoder_hidden_states, **per_row):
        return self._unet(sample, timestep, encoder_hidden_states, **per_row)

    def regional_unet(self, sample, timestep, encoder_hidden_states, region_weights):
        return self._regional(sample, timestep, encoder_hidden_states, region_weights=region_weights)

    def decode(self, latents):
        return self.text_vae.decode(latents)

    def encode_image(self, images):
        return self.text_vae.encode_image(images)


def build_models(choice: RunnerChoice, repo_dir, version: str, bls, facts: dict, log=print) -> ModelCalls:
    """The engine's models for one UNet variant of the pipeline at `repo_dir`/pipeline/`version`
    (`facts`: its entry of pipeline.json's variants table); `bls` reaches its component models
    through Triton."""
    repo_dir = Path(repo_dir)
    components = facts["components"]
    torch_models = None
    if choice.torch_components:
        from serving.models.torch_runner import TorchModels

        checkpoint = repo_dir / "pipeline" / version / facts.get("torch_checkpoint", CHECKPOINT_COPY)
        torch_models = TorchModels(checkpoint, choice.torch, choice.torch_components, log=log)
    text_vae = torch_models if choice.text_vae == "torch" else bls
    has_regional = "unet_regional" in components
    if choice.unet == "bls":
        return ModelCalls(text_vae, bls.unet, bls.regional_unet if has_regional else None)
    if choice.unet == "torch":  # regions in latent mode only: no regional UNet is exported for it
        return ModelCalls(text_vae, torch_models.unet, row_cap=torch_models.row_cap)
    from serving.models.onnx import LocalUnet, OnnxComponent

    def local(model):
        return LocalUnet(OnnxComponent(repo_dir / model / "1" / "model.onnx"))

    return ModelCalls(text_vae, local(components["unet"]), local(components["unet_regional"]) if has_regional else None)
