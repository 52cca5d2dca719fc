"""The UNet variants each served model holds, which variant each task runs on, and the runner
that sends each job to its model's variant's Runner. Imports nothing from Triton.

A pipeline serves one or more models (checkpoints, each of a family: families/); a model holds
one or more variants.

A variant is one checkpoint's UNet with the text encoder, VAE, tokenizer and schedule it was
trained with (`ldm export` shares the components that are identical between variants):
- "base": text-to-image UNet (latents in): tasks txt2img, img2img, and inpaint by latent
  blending when there is no inpainting UNet;
- "inpaint": 9-channel inpainting UNet (latents, mask, masked-image latents in): task inpaint;
- "upscale": x4 upscaler (latents and the noised low-res image in, noise level as class labels).
Jobs of different models or variants never share a UNet call (their networks and channel
layouts differ): the job's call key carries both.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

TASKS = ("txt2img", "img2img", "inpaint", "upscale")
VARIANT_NAMES = {"base": "text-to-image", "inpaint": "inpainting", "upscale": "x4-upscaler"}


@dataclass(frozen=True)
class VariantSpec:
    """One variant's entry in pipeline.json (written by export/repository.py)."""

    name: str
    components: dict[str, Any]  # component (text_encoder, unet, vae_decoder, vae_encoder) -> Triton model name
    tokenizers: dict[str, Any]  # the text encoder's token-id input -> its tokenizer's folder beside pipeline.json
    text_length: int
    latent_channels: int
    vae_factor: int
    size_multiple: int  # output pixels
    native_size: int
    max_size: int
    scheduler_config: dict[str, Any]
    preview: dict[str, Any] | None = None
    low_res_scheduler_config: dict[str, Any] | None = None  # upscale
    max_noise_level: int | None = None  # upscale
    max_batch: dict[str, Any] = field(default_factory=dict)  # component -> the most rows one call of its model takes
    family: str = "sd"  # families/ FAMILIES
    text_outputs: tuple[Any, ...] = ("last_hidden_state",)  # the text encoder's outputs, in its contract's order
    zero_empty_negative: bool = False  # SDXL's force_zeros_for_empty_prompt
    token_lengths: dict[str, Any] = field(
        default_factory=dict
    )  # token-id input -> ids per prompt (default: text_length)
    checked_inputs: tuple[Any, ...] = (
        "input_ids",
    )  # the token-id inputs whose length refuses a prompt (others truncate)
    distilled_guidance: bool = False  # the denoiser takes guidance_scale as an input (Flux dev)
    lora_unet: str | None = None  # the denoiser with mixed LoRA inputs (a file beside pipeline.json), where exported
    lora_unet_layers: dict[str, Any] = field(default_factory=dict)  # its adapted layers: name -> (in, out)
    lora_text_encoder: str | None = None  # the text encoder with mixed LoRA inputs, where exported
    lora_text_encoder_layers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def table(cls, info: dict[str, Any]) -> dict[str, Any]:
        """{name: VariantSpec} from pipeline.json's variants table."""
        if "variants" not in info:
            raise ValueError("pipeline.json has no variants table (an export by an older version): re-run `ldm export`")
        fields = cls.__dataclass_fields__
        kept: dict[str, dict[str, Any]] = {
            name: {
                k: tuple(v) if k in ("text_outputs", "checked_inputs") else v for k, v in facts.items() if k in fields
            }
            for name, facts in info["variants"].items()
        }
        return {name: cls(name=name, **values) for name, values in kept.items()}


def variant_for(task: str, available: Any) -> str | None:
    """The variant `task` runs on among `available`, or None when none can run it. Inpainting
    prefers an inpainting UNet and falls back to latent blending with the base one."""
    if task == "inpaint" and "inpaint" in available:
        return "inpaint"
    wanted = "upscale" if task == "upscale" else "base"
    return wanted if wanted in available else None


class VariantRunners:
    """The engine's runner (admit, step, decode) over several models' variants: each job goes to
    the Runner of its (model, variant); a step's jobs share one call key, hence one of them."""

    def __init__(self, runners: dict[tuple[str, str], Any]) -> None:
        self.runners = runners

    def admit(self, jobs: list[Any], steered: list[Any] | tuple[Any, ...] = ()) -> None:
        new, changed = _by_variant(jobs), _by_variant(steered)
        for variant in {**new, **changed}:
            self.runners[variant].admit(new.get(variant, []), changed.get(variant, []))

    def step(self, jobs: list[Any]) -> None:
        self.runners[_runner_key(jobs[0])].step(jobs)

    def release(self, jobs: list[Any]) -> None:
        for key, group in _by_variant(jobs).items():
            self.runners[key].release(group)

    def decode(self, jobs: list[Any]) -> list[Any]:
        images: dict[int, Any] = {}
        for variant, group in _by_variant(jobs).items():
            for job, image in zip(group, self.runners[variant].decode(group)):
                images[id(job)] = image
        return [images[id(job)] for job in jobs]


def _runner_key(job: Any) -> tuple[Any, ...]:
    return (job.model, job.variant)


def _by_variant(jobs: list[Any] | tuple[Any, ...]) -> dict[tuple[str, str], list[Any]]:
    groups = defaultdict(list)
    for job in jobs:
        groups[_runner_key(job)].append(job)
    return groups
