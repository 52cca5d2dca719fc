"""LoRA adapter files read into per-layer matrices the mixed-adapter layers use (families/lora.py).

Reading uses the ecosystem's code end to end: diffusers' `lora_state_dict` reads the file in any
format it knows (diffusers/PEFT, kohya-ss/A1111 `lora_unet_*`/`lora_te_*` with `alpha`, ...) and
converts the keys; diffusers' `load_lora_adapter` / `load_lora_into_text_encoder` then put it into
an empty (meta-device) copy of the served model's denoiser and text encoder, so PEFT resolves
each layer's rank, alpha and scaling exactly as `load_lora_weights` does for the reference. From
each PEFT LoRA layer we keep A [in, r] and B [r, out] x scaling (the per-layer alpha / rank folded
into B, so a call's scale matrix carries only the request's weight).

An adapter whose layers do not fit the served model is refused naming the first such layer.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.core.lora import AdapterRejected

TEXT_PREFIX = "text_encoder"
DENOISER_PREFIX = "unet"


class AdapterError(AdapterRejected):
    """A file that is not a LoRA for the served model."""


@dataclass(frozen=True)
class Adapter:
    name: str
    rank: int  # the largest rank of its layers: the bank columns it takes
    denoiser: dict  # layer name -> (A [in, r], B [r, out] x scaling), float32
    text: dict  # text-encoder layer name -> (A, B x scaling)
    nbytes: int

    @property
    def touches_text(self) -> bool:
        return bool(self.text)


def read_adapter(path, name: str, checkpoint_dir) -> Adapter:
    """Reads a LoRA file for the checkpoint at `checkpoint_dir` (an SD 1.x/2.x pipeline folder)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from families.lora import adaptable_layers

    path, checkpoint_dir = Path(path), Path(checkpoint_dir)
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as exc:  # not safetensors, or not a LoRA diffusers knows
        raise AdapterError(f"{path.name}: not a LoRA file diffusers can read: {exc}") from None
    if not state:
        raise AdapterError(f"{path.name}: holds no LoRA weights")
    from diffusers.utils import logging as diffusers_logging

    # loading into an empty model leaves its base weights "missing": diffusers says so, and it is expected
    diffusers_logging.set_verbosity_error()
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(checkpoint_dir / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(checkpoint_dir / "text_encoder"))
    parts = {}
    for prefix, model in ((DENOISER_PREFIX, unet), (TEXT_PREFIX, text)):
        own = {k: v for k, v in state.items() if k.startswith(f"{prefix}.")}
        if not own:
            parts[prefix] = {}
            continue
        _check_layers(path.name, prefix, own, adaptable_layers(model))
        with torch.no_grad():
            if prefix == DENOISER_PREFIX:
                model.load_lora_adapter(
                    own,
                    prefix=prefix,
                    network_alphas=alphas,
                    adapter_name=name,
                    metadata=metadata,
                    low_cpu_mem_usage=True,
                )
            else:
                StableDiffusionPipeline.load_lora_into_text_encoder(
                    own, alphas, model, prefix=prefix, adapter_name=name, metadata=metadata, low_cpu_mem_usage=True
                )
        parts[prefix] = _layers(model, own, prefix, name)
    ranks = [a.shape[1] for part in parts.values() for a, _ in part.values()]
    nbytes = sum(a.nbytes + b.nbytes for part in parts.values() for a, b in part.values())
    return Adapter(name, max(ranks), parts[DENOISER_PREFIX], parts[TEXT_PREFIX], nbytes)


def _layers(model, state: dict, prefix: str, adapter: str) -> dict:
    """{layer: (A [in, r], B x scaling [r, out])} from the file's converted weights and PEFT's
    scaling of each LoRA layer of `model`."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.tuners.lora import LoraLayer

    weights = (
        convert_unet_state_dict_to_peft({k.removeprefix(f"{prefix}."): v for k, v in state.items()})
        if prefix == DENOISER_PREFIX
        else _text_peft_keys(state, prefix)
    )
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            a = weights[f"{name}.lora_A.weight"].float().numpy()  # [r, in] (a 1x1 conv: [r, in, 1, 1])
            b = weights[f"{name}.lora_B.weight"].float().numpy()  # [out, r]
            scaling = float(module.scaling[adapter])
            out[name] = (
                np.ascontiguousarray(a.reshape(a.shape[0], -1).T),
                np.ascontiguousarray((b.reshape(b.shape[0], -1) * scaling).T),
            )
    return out


def _text_peft_keys(state: dict, prefix: str) -> dict:
    from diffusers.utils import convert_state_dict_to_peft

    # files made with transformers 4 name CLIP's layers text_model.encoder...; transformers 5's
    # model has no text_model level (diffusers' loader drops that prefix the same way)
    return convert_state_dict_to_peft(
        {k.removeprefix(f"{prefix}.").removeprefix("text_model."): v for k, v in state.items()}
    )


def _check_layers(file: str, prefix: str, state: dict, layers: dict) -> None:
    """Refuses the first layer of the file the served model has not, or whose shape differs."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    weights = (
        convert_unet_state_dict_to_peft({k.removeprefix(f"{prefix}."): v for k, v in state.items()})
        if prefix == DENOISER_PREFIX
        else _text_peft_keys(state, prefix)
    )
    for key in sorted(weights):
        if not key.endswith(".lora_A.weight"):
            continue
        layer = key.removesuffix(".lora_A.weight")
        if layer not in layers:
            raise AdapterError(f"{file}: layer {prefix}.{layer} is not a layer of the served model that takes a LoRA")
        a, b = weights[key], weights[f"{layer}.lora_B.weight"]
        fan_in, fan_out = layers[layer]
        if a.reshape(a.shape[0], -1).shape[1] != fan_in or b.shape[0] != fan_out:
            raise AdapterError(
                f"{file}: layer {prefix}.{layer} is {a.shape[1]} -> {b.shape[0]} in the file, "
                f"{fan_in} -> {fan_out} in the served model"
            )
