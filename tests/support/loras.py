"""Two LoRA adapters in diffusers' format (different ranks, alphas and target layers) with random
non-zero weights, written by diffusers itself: the engine's mixed-LoRA tests and the LoRA API's
end-to-end tests read the same files."""

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

ADAPTERS = {  # name: (seed, rank, alpha, targets)
    "a": (1, 4, 8, ["to_q", "to_k", "to_v", "to_out.0"]),
    "b": (2, 2, 2, ["to_q", "to_v", "proj_in", "proj_out", "ff.net.2"]),
}


def write_lora(checkpoint, folder, seed, rank, alpha, targets):
    """A LoRA in diffusers' format with random non-zero weights, saved by diffusers itself."""
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": targets},
    )
    return folder / "pytorch_lora_weights.safetensors"


def served_with_loras(checkpoint, folder, repo):
    """The in-process pipeline (ONNX Runtime, not started: tests drain it) of `checkpoint` exported
    with LoRA inputs and the adapters of `folder` (if any) registered."""
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.core.config import PipelineConfig
    from serving.core.service import PipelineAssets, PipelineService
    from serving.models.adapters import read_adapter
    from serving.models.onnx import local_variants

    params = pipeline_parameters(lora=True, lora_dir=str(folder) if folder else "")
    write_repository(checkpoint, repo, pipeline_parameters=params, log=lambda *a: None)
    return PipelineService(
        PipelineAssets.read(repo / "pipeline" / "1"),
        PipelineConfig.parse({k: str(v) for k, v in params.items()}),
        local_variants(repo),
        lora_reader=read_adapter,
    )
