"""Which runner serves each component, from the pipeline's configuration (serving/core/config.py).

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

from typing import TYPE_CHECKING
from dataclasses import dataclass
from pathlib import Path

from serving.core.config import PipelineConfig, refuse
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
    def from_config(cls, config: PipelineConfig, device: str) -> "RunnerChoice":
        if config.unet not in UNET_RUNNERS:
            refuse("unet", config.unet, f"must be one of {UNET_RUNNERS}")
        if config.text_vae not in TEXT_VAE_RUNNERS:
            refuse("text_vae", config.text_vae, f"must be one of {TEXT_VAE_RUNNERS}")
        options = TorchOptions(
            device=device,
            buckets=parse_buckets(config.torch_buckets) if config.torch_buckets else None,
            max_rows=config.max_rows,
            cuda_graphs=config.cuda_graphs,
            compile=config.torch_compile,
            lora_columns=config.lora_columns,
        )
        return cls(config.unet, config.text_vae, options)

    @property
    def torch_components(self) -> tuple:
        return (("text_encoder", "vae") if self.text_vae == "torch" else ()) + (
            ("unet",) if self.unet == "torch" else ()
        )


class ModelCalls:
    """The engine's models: the text encoder and VAE from one provider, the UNet from another.
    regional: the regional UNet (regions' attention mode), or None where the export has none.
    row_cap: the UNet rows per call the UNet's device can serve, when its runner knows it."""

    def __init__(self, text_vae, unet, regional=None, row_cap=None, torch_models=None):
        self.text_vae = text_vae
        self._unet = unet
        self._regional = regional
        self.row_cap = row_cap
        self.torch_models = torch_models  # the TorchModels it runs components with, if any (its memory plan)
        self.lora_text = None  # the text encoder's LoRA graph in this process, where exported (it takes LoRA inputs)

    def encode_text(self, input_ids, **more_ids):
        """Token ids by input name (input_ids, and SDXL's input_ids_2) -> the text encoder's outputs by name."""
        if self.lora_text is not None:
            return self.lora_text(input_ids=input_ids, **more_ids)
        return self.text_vae.encode_text(input_ids, **more_ids)

    def unet(self, sample, timestep, encoder_hidden_states, **per_row):
        return self._unet(sample, timestep, encoder_hidden_states, **per_row)

    def regional_unet(self, sample, timestep, encoder_hidden_states, **per_row):
        return self._regional(sample, timestep, encoder_hidden_states, **per_row)

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
        lora_layers = facts.get("lora_unet_layers") if choice.unet == "torch" else None
        torch_models = TorchModels(
            checkpoint,
            choice.torch,
            choice.torch_components,
            log=log,
            plan=False,
            lora_layers={k: tuple(v) for k, v in lora_layers.items()} if lora_layers else None,
        )
    text_vae = torch_models if choice.text_vae == "torch" else bls
    has_regional = "unet_regional" in components
    if facts.get("lora_unet") and choice.unet == "bls":
        raise ValueError(
            "LoRA adapters are served by the UNet runners in the pipeline's process (unet=inprocess or "
            "torch), not unet=bls: export without --lora/--lora-dir, or with another --unet"
        )
    if choice.unet == "bls":
        calls = ModelCalls(text_vae, bls.unet, bls.regional_unet if has_regional else None, torch_models=torch_models)
    elif choice.unet == "torch":  # regions in latent mode only: no regional UNet is exported for it
        assert torch_models is not None  # unet=torch is a torch component
        calls = ModelCalls(text_vae, torch_models.unet, row_cap=torch_models.row_cap, torch_models=torch_models)
    else:
        calls = _inprocess_calls(text_vae, repo_dir, version, facts, components, has_regional, torch_models)
    if facts.get("lora_text_encoder"):  # the text encoder's LoRA graph in this process, whoever runs the rest
        from serving.models.onnx import OnnxComponent

        calls.lora_text = OnnxComponent(repo_dir / "pipeline" / version / facts["lora_text_encoder"])
    return calls


def _inprocess_calls(
    text_vae, repo_dir: Path, version: str, facts: dict, components: dict, has_regional: bool, torch_models
) -> ModelCalls:
    from serving.models.onnx import LocalUnet, OnnxComponent

    def local(model):
        return LocalUnet(OnnxComponent(repo_dir / model / "1" / "model.onnx"))

    # with LoRA inputs every call runs the LoRA graph: a row without adapters gets base + 0, exactly
    unet = (
        LocalUnet(OnnxComponent(repo_dir / "pipeline" / version / facts["lora_unet"]))
        if facts.get("lora_unet")
        else local(components["unet"])
    )
    return ModelCalls(
        text_vae, unet, local(components["unet_regional"]) if has_regional else None, torch_models=torch_models
    )


def plan_gpu_memory(models) -> None:
    """Makes the torch runners' memory plans once every served model's weights are loaded (GPU:
    CUDA graphs are captured in what the weights of all checkpoints leave free, each keeping
    the largest VAE decoder's peak free), and sets each UNet's row cap from its plan."""
    runners = list({id(m.torch_models): m.torch_models for m in models if m.torch_models is not None}.values())
    reserve = max((r.vae_peak_bytes() for r in runners if r.options.kind == "cuda"), default=None)
    for runner in runners:
        runner.plan_memory(reserve)
    for m in models:
        if m.torch_models is not None and m._unet == m.torch_models.unet:
            m.row_cap = m.torch_models.row_cap


if TYPE_CHECKING:  # mypy checks the implementations against the core's Protocols (serving/core/interfaces.py)
    from serving.core.interfaces import RunnerModels

    _checked: type[RunnerModels] = ModelCalls
