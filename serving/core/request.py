"""Per-request parameters: defaults, limits and validation. Imports nothing from Triton.

Every rejection names the field and the allowed range, so a client can fix its request.
"""

from dataclasses import dataclass, field, replace
import math
import re
import unicodedata
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from families import FAMILIES
from serving.core import image_request
from serving.core import samplers
from serving.core.variants import VariantSpec

if TYPE_CHECKING:
    from serving.core.config import PipelineConfig
    from serving.core.regions import RegionLimits, Regions


class InvalidInput(ValueError):
    """A request field is missing, malformed or out of range."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class Field:
    """One input of the pipeline's tensor contract, declared once: the Triton configs, the
    clients and the parser below all read this table."""

    name: str
    dtype: str  # numpy dtype name; "bytes" for UTF-8 text
    dims: tuple[Any, ...] = (1,)  # Triton dims (-1: any size)
    required: bool = False
    streaming_only: bool = False  # progress responses exist only on the decoupled stream


FIELDS = (
    Field("prompt", "bytes", required=True),
    # which served model (GET /v1/models); the pipeline's default model when absent
    Field("model", "bytes"),
    Field("negative_prompt", "bytes"),
    Field("seed", "int64"),
    Field("steps", "int32"),
    Field("guidance_scale", "float32"),
    Field("height", "int32"),
    Field("width", "int32"),
    Field("eta", "float32"),
    Field("progress_every", "int32", streaming_only=True),
    Field("preview_every", "int32", streaming_only=True),
    Field("timeout_s", "float32"),
    # samplers (serving/core/samplers/)
    Field("sampler", "bytes"),
    Field("sigma_schedule", "bytes"),
    Field("guidance_interval", "float32", dims=(2,)),
    # regional prompts (serving/core/regions.py)
    Field("region_prompts", "bytes", dims=(-1,)),
    Field("region_negative_prompts", "bytes", dims=(-1,)),
    Field("region_divisions", "bytes"),
    Field("region_masks", "uint8", dims=(-1, -1, -1)),
    Field("base_prompt_weight", "float32"),
    Field("region_mode", "bytes"),
    # image-conditioned generation (serving/core/image_request.py)
    Field("task", "bytes"),
    Field("init_image", "uint8", dims=(-1, -1, 3)),
    Field("mask", "uint8", dims=(-1, -1)),
    Field("strength", "float32"),
    Field("mask_blur", "int32"),
    Field("keep_unmasked", "bool"),
    Field("noise_level", "int32"),
    # SDXL's size conditioning (families/sdxl.py): (height, width), (top, left), (height, width)
    Field("original_size", "int32", dims=(2,)),
    Field("crop_top_left", "int32", dims=(2,)),
    Field("target_size", "int32", dims=(2,)),
    # Flux's true classifier-free guidance with a negative prompt (families/flux.py)
    Field("true_cfg_scale", "float32"),
    # LoRA adapters (serving/core/lora.py): names and weights, one each per adapter; also
    # A1111's <lora:name:weight> inside the prompt
    Field("lora_names", "bytes", dims=(-1,)),
    Field("lora_weights", "float32", dims=(-1,)),
)
FAMILY_FIELDS = (
    "original_size",
    "crop_top_left",
    "target_size",
    "true_cfg_scale",
)  # read by the families that declare them
MAX_CONDITIONING_SIZE = 16384  # pixels: the largest original/target side or crop offset accepted


@dataclass(frozen=True)
class RequestLimits:
    """Defaults and limits, from the pipeline's config.pbtxt parameters and the checkpoint."""

    size_multiple: int  # pixels; the VAE factor times the UNet's downsampling
    default_size: int
    max_size: int
    max_prompt_tokens: int
    default_steps: int = 25
    max_steps: int = 150
    default_guidance_scale: float = 5.0
    max_guidance_scale: float = 50.0
    default_eta: float = 0.0
    max_timeout_s: float = 3600.0
    # UTF-8 bytes of one text input (prompt, negative_prompt, each region prompt), refused before
    # it is decoded or tokenized: the tokenizer's lock is shared with the engine's encoding
    max_prompt_bytes: int = 4096
    regions: "RegionLimits | None" = None
    # the UNet variants served, by name (serving/core/variants.py); none: text-to-image only
    variants: dict[str, Any] = field(default_factory=dict)
    # (sampler, sigma schedule) of requests that name none: config parameter default_sampler
    # (`ldm serve --sampler`), else the checkpoint's scheduler class
    default_sampler: tuple[Any, ...] = ("ddim", "default")
    family: str = "sd"  # the served model's family (families/): which family fields it reads
    distilled_guidance: bool = False  # its denoiser takes guidance_scale as an input (Flux dev)
    model: str = ""  # the served model's name

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The served checkpoint's scheduler config (its base variant's)."""
        variant = self.variants.get("base") or next(iter(self.variants.values()), None)
        return variant.scheduler_config if variant is not None else {}

    @classmethod
    def from_config(cls, config: "PipelineConfig", pipeline_info: dict[str, Any]) -> "RequestLimits":
        """A served model's limits: the pipeline's configuration over its checkpoint's facts
        (its entry of pipeline.json's models table)."""
        from serving.core.regions import RegionLimits  # imported here: regions imports this module

        max_size = config.max_size or int(pipeline_info["max_size"])
        limits = cls(
            size_multiple=int(pipeline_info["size_multiple"]),
            # the native size, or the largest size served where that is smaller (an export with --max-size)
            default_size=config.default_size or min(int(pipeline_info["native_size"]), max_size),
            max_size=max_size,
            max_prompt_tokens=int(pipeline_info["text_length"]),
            default_steps=config.default_steps,
            max_steps=config.max_steps,
            default_guidance_scale=(
                config.default_guidance_scale
                if config.default_guidance_scale is not None
                else FAMILIES[pipeline_info.get("family", "sd")].default_guidance_scale
            ),
            max_guidance_scale=config.max_guidance_scale,
            default_eta=config.default_eta,
            max_prompt_bytes=config.max_prompt_bytes,
            regions=RegionLimits.from_config(config, pipeline_info),
            variants=VariantSpec.table(pipeline_info),
            family=pipeline_info.get("family", "sd"),
            model=pipeline_info.get("name", ""),
            distilled_guidance=bool(
                pipeline_info["variants"][pipeline_info["primary"]].get("distilled_guidance", False)
            )
            if "variants" in pipeline_info
            else False,
        )
        limits = replace(limits, default_sampler=_default_sampler(config.default_sampler, limits.scheduler_config))
        limits.check(int(pipeline_info["max_size"]))
        return limits

    def check(self, exported_max_size: int) -> None:
        """Refuses defaults and limits that contradict each other or the exported models, naming
        the config.pbtxt parameter (a bad default would otherwise fail requests later, deep in a
        model call)."""

        def refuse(key: str, value: Any, why: str) -> NoReturn:
            raise ValueError(f"pipeline config.pbtxt parameter {key}={value!r} {why}")

        train_steps = min(
            (int(v.scheduler_config.get("num_train_timesteps", 1000)) for v in self.variants.values()), default=1000
        )
        if not 1 <= self.max_steps <= train_steps:
            refuse("max_steps", self.max_steps, f"must be in [1, {train_steps}] (the schedule's num_train_timesteps)")
        if not 1 <= self.default_steps <= self.max_steps:
            refuse("default_steps", self.default_steps, f"must be in [1, max_steps={self.max_steps}]")
        m = self.size_multiple
        if not m <= self.max_size <= exported_max_size or self.max_size % m:
            refuse(
                "max_size",
                self.max_size,
                f"must be a multiple of {m} in [{m}, {exported_max_size}] (the exported models' largest size)",
            )
        if not m <= self.default_size <= self.max_size or self.default_size % m:
            refuse("default_size", self.default_size, f"must be a multiple of {m} in [{m}, max_size={self.max_size}]")
        if not (math.isfinite(self.max_guidance_scale) and self.max_guidance_scale >= 0):
            refuse("max_guidance_scale", self.max_guidance_scale, "must be a finite number >= 0")
        if not (
            math.isfinite(self.default_guidance_scale) and 0 <= self.default_guidance_scale <= self.max_guidance_scale
        ):
            refuse(
                "default_guidance_scale",
                self.default_guidance_scale,
                f"must be in [0, max_guidance_scale={self.max_guidance_scale}]",
            )
        if not (math.isfinite(self.default_eta) and 0 <= self.default_eta <= 1):
            refuse("default_eta", self.default_eta, "must be in [0, 1]")
        if self.max_prompt_bytes < 1:
            refuse("max_prompt_bytes", self.max_prompt_bytes, "must be at least 1")
        if self.regions is not None and not (
            math.isfinite(self.regions.default_base_weight) and 0 <= self.regions.default_base_weight <= 1
        ):
            refuse("default_base_prompt_weight", self.regions.default_base_weight, "must be in [0, 1]")


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    height: int
    width: int
    eta: float
    # streaming options: 0 means never
    progress_every: int = 0
    preview_every: int = 0
    timeout_s: float = 0.0
    regions: "Regions | None" = None  # a prompt per region of the image
    image: "image_request.ImageInput | None" = None  # img2img, inpaint, upscale; None: text-to-image
    sampler: str = "ddim"  # serving/core/samplers: its name
    sigma_schedule: str = "default"
    guidance_interval: tuple[Any, ...] = (0.0, 1.0)  # fractions of the run with classifier-free guidance
    family_fields: dict[str, Any] = field(default_factory=dict)  # the family's own fields given (SDXL's sizes)
    # how its rows are guided (families/: `guidance`): "cfg" (guidance_scale > 1: an unconditional
    # row), or "true_cfg" (one row; the negative prompt's row only with true_cfg_scale > 1), with
    # guidance_scale as a denoiser input where the checkpoint is guidance-distilled
    guidance_rule: str = "cfg"
    guidance_input: bool = False
    true_cfg_scale: float = 1.0
    loras: tuple[Any, ...] = ()  # ((adapter name, weight), ...): the fields' and the prompt's <lora:name:weight>
    family: str = "sd"  # the served model's family (families/)

    @property
    def strength(self) -> float:
        """The share of the schedule it denoises (image-to-image and inpainting: less than 1)."""
        return 1.0 if self.image is None else self.image.strength

    @property
    def denoising_steps(self) -> int:
        """How many of its steps it denoises (image-to-image and inpainting: the strength's share,
        by its family's pipeline's rule: families/ `kept_steps`)."""
        return FAMILIES[self.family].kept_steps(self.steps, self.strength)


def parse_request(inputs: dict[str, Any], limits: RequestLimits, default_seed: int) -> GenerationRequest:
    """Build a request from named input arrays (missing optional inputs are absent or None)."""
    check_text_sizes(inputs, limits.max_prompt_bytes)
    prompt, prompt_loras = lora_tags(_text(inputs, "prompt", required=True))
    if is_blank(prompt):
        raise InvalidInput("prompt", "must not be empty (nor only spaces or invisible characters)")
    negative = _text(inputs, "negative_prompt", required=False)
    steps = _integer(inputs, "steps", limits.default_steps, 1, limits.max_steps)
    guidance = _real(inputs, "guidance_scale", limits.default_guidance_scale, 0.0, limits.max_guidance_scale)
    eta = _real(inputs, "eta", limits.default_eta, 0.0, 1.0)
    seed = _integer(inputs, "seed", default_seed, 0, 2**63 - 1)
    image = image_request.parse_image_input(inputs, limits, steps)
    sizes = {}
    for name in ("height", "width"):
        if image is not None:  # the image sets the size
            sizes[name] = image_request.output_side(inputs, name, image)
            continue
        value = _integer(inputs, name, limits.default_size, limits.size_multiple, limits.max_size)
        if value % limits.size_multiple:
            raise InvalidInput(
                name,
                f"must be a multiple of {limits.size_multiple} in [{limits.size_multiple}, {limits.max_size}], got {value}",
            )
        sizes[name] = value
    progress_every = _integer(inputs, "progress_every", 0, 0, limits.max_steps)
    preview_every = _integer(inputs, "preview_every", 0, 0, limits.max_steps)
    timeout_s = _real(inputs, "timeout_s", 0.0, 0.0, limits.max_timeout_s)
    from serving.core.regions import parse_regions  # imported here: regions imports this module

    regions = parse_regions(inputs, limits.regions, sizes["height"], sizes["width"])
    sampler, sigma_schedule = parse_sampler(inputs, limits, steps)
    family_fields = _family_fields(inputs, limits.family, limits.max_guidance_scale)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        height=sizes["height"],
        width=sizes["width"],
        eta=eta,
        progress_every=progress_every,
        preview_every=preview_every,
        timeout_s=timeout_s,
        regions=regions,
        image=image,
        sampler=sampler,
        sigma_schedule=sigma_schedule,
        guidance_interval=_guidance_interval(inputs),
        family_fields=family_fields,
        guidance_rule=FAMILIES[limits.family].guidance,
        guidance_input=limits.distilled_guidance,
        true_cfg_scale=family_fields.get("true_cfg_scale", 1.0),
        loras=_loras(inputs) + prompt_loras,
        family=limits.family,
    )


LORA_TAG = re.compile(r"<lora:([^:<>]+):([^:<>]+)>", re.IGNORECASE)


def lora_tags(prompt: str) -> tuple[Any, ...]:
    """(the prompt without its A1111 <lora:name:weight> tags, ((name, weight), ...)): the tags are
    removed before encoding, as A1111 does; a malformed weight is refused naming `prompt`."""
    loras = []
    for match in LORA_TAG.finditer(prompt):
        try:
            loras.append((match.group(1).strip(), float(match.group(2))))
        except ValueError:
            raise InvalidInput(
                "prompt", f"<lora:{match.group(1)}:{match.group(2)}>: the weight must be a number"
            ) from None
    if not loras:
        return prompt, ()
    return " ".join(LORA_TAG.sub(" ", prompt).split()), tuple(loras)


def _loras(inputs: dict[str, Any]) -> tuple[Any, ...]:
    names, weights = inputs.get("lora_names"), inputs.get("lora_weights")
    if names is None and weights is None:
        return ()
    names = [
        decode_text("lora_names", n) for n in np.asarray(names if names is not None else [], dtype=object).reshape(-1)
    ]
    if weights is not None and np.asarray(weights).dtype.kind not in "iuf":
        raise InvalidInput("lora_weights", f"must be numbers (FP32), got {np.asarray(weights).dtype}")
    weights = np.asarray(weights if weights is not None else np.ones(len(names)), dtype=np.float64).reshape(-1)
    if len(weights) != len(names):
        raise InvalidInput(
            "lora_weights", f"must hold one weight per name in lora_names ({len(names)}), got {len(weights)}"
        )
    return tuple((n, float(w)) for n, w in zip(names, weights))


def _family_fields(inputs: dict[str, Any], family: str, max_guidance_scale: float) -> dict[str, Any]:
    """The family fields given (sizes as (a, b) pairs); refused for a family that does not read them."""
    out = {}
    for name in FAMILY_FIELDS:
        value = inputs.get(name)
        if value is None:
            continue
        if name not in FAMILIES[family].request_fields:
            readers = ", ".join(f.name for f in FAMILIES.values() if name in f.request_fields)
            raise InvalidInput(name, f"is read by family {readers} only; this model is family {family}")
        if name == "true_cfg_scale":
            out[name] = _real(inputs, name, 1.0, 0.0, max_guidance_scale)
            continue
        array = np.asarray(value)
        low = 0 if name == "crop_top_left" else 1
        if (
            array.size != 2
            or array.dtype.kind not in "iu"
            or not all(low <= v <= MAX_CONDITIONING_SIZE for v in array.reshape(-1))
        ):
            raise InvalidInput(
                name,
                f"must be two integers in [{low}, {MAX_CONDITIONING_SIZE}] (pixels), got {array.reshape(-1).tolist()}",
            )
        out[name] = tuple(int(v) for v in array.reshape(-1))
    return out


def parse_sampler(inputs: dict[str, Any], limits: RequestLimits, steps: int) -> tuple[Any, ...]:
    """(sampler, sigma schedule) of a request: `sampler` by our name or A1111's display name,
    `sigma_schedule` (default: the name's); refused when it does not fit the served model."""
    name = _text(inputs, "sampler", required=False)
    schedule = _text(inputs, "sigma_schedule", required=False) or None
    if not name:
        name, schedule = limits.default_sampler[0], schedule or limits.default_sampler[1]
    try:
        name, schedule = samplers.resolve_name(name, schedule)
    except ValueError as exc:
        field_name, message = str(exc).split(": ", 1)
        raise InvalidInput(field_name, message) from None
    error = samplers.registry.fit_error(name, limits.scheduler_config)
    if error:
        raise InvalidInput("sampler", error.split(": ", 1)[1])
    if name == "lcm":  # LCM picks its timesteps among original_inference_steps
        limit = int(limits.scheduler_config.get("original_inference_steps", 50))
        if steps > limit:
            raise InvalidInput(
                "steps",
                f"must be at most {limit} with sampler lcm (the checkpoint's original_inference_steps), got {steps}",
            )
    return name, schedule


def _guidance_interval(inputs: dict[str, Any]) -> tuple[Any, ...]:
    value = inputs.get("guidance_interval")
    if value is None:
        return (0.0, 1.0)
    array = np.asarray(value)
    if array.size != 2 or array.dtype.kind not in "fiu":
        raise InvalidInput("guidance_interval", "must be two numbers [lo, hi] with 0 <= lo < hi <= 1")
    # the decimal an FP32 tensor carries (0.8, not 0.800000011920929), as for strength
    lo, hi = (float(str(np.float32(v))) for v in array.reshape(-1))
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
        raise InvalidInput(
            "guidance_interval", f"must be two numbers [lo, hi] with 0 <= lo < hi <= 1, got [{lo}, {hi}]"
        )
    return (lo, hi)


def _default_sampler(configured: str, scheduler_config: dict[str, Any]) -> tuple[Any, ...]:
    """config parameter default_sampler (a name or A1111 name; `ldm serve --sampler`), else the
    sampler the checkpoint's scheduler class names; refused at load when it does not fit."""
    try:
        return samplers.registry.served_default(configured, scheduler_config)
    except ValueError as exc:
        raise ValueError(f"pipeline config.pbtxt parameter default_sampler={configured!r}: {exc}") from None


TEXT_FIELDS = {f.name: f.dims for f in FIELDS if f.dtype == "bytes"}


def check_text_sizes(inputs: dict[str, Any], max_bytes: int) -> None:
    """Refuses any text input longer than `max_bytes` UTF-8 bytes, before it is decoded (a
    multi-megabyte prompt would hold the tokenizer's lock, shared with the engine, for long)."""
    for name, dims in TEXT_FIELDS.items():
        value = inputs.get(name)
        if value is None:
            continue
        array = np.asarray(value)
        if array.dtype != object:
            continue  # not text: the field's own parser names it
        for i, item in enumerate(array.reshape(-1)):
            size = (
                len(item)
                if isinstance(item, bytes)
                else len(item.encode("utf-8", "replace"))
                if isinstance(item, str)
                else 0
            )
            if size > max_bytes:
                raise InvalidInput(
                    name if dims == (1,) else f"{name}[{i}]",
                    f"is {size} bytes long; at most {max_bytes} UTF-8 bytes (max_prompt_bytes)",
                )


# what a blank text is made of: separators (Z*), controls and format characters (Cc, Cf: zero-width
# space and joiners, BOM, bidi marks), unassigned code points and lone surrogates
_INVISIBLE = ("Zs", "Zl", "Zp", "Cc", "Cf", "Cn", "Cs")


def is_blank(text: str) -> bool:
    """Whether `text` holds nothing visible: empty, or only whitespace and invisible characters."""
    return all(unicodedata.category(c) in _INVISIBLE for c in text)


def _scalar(inputs: dict[str, Any], name: str) -> Any:
    value = inputs.get(name)
    if value is None:
        return None
    array = np.asarray(value)
    if array.size != 1:
        raise InvalidInput(name, f"must hold exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def text_field(inputs: dict[str, Any], name: str) -> str:
    """An optional text input ("" when absent)."""
    return _text(inputs, name, required=False)


def _text(inputs: dict[str, Any], name: str, required: bool) -> str:
    value = _scalar(inputs, name)
    if value is None:
        if required:
            raise InvalidInput(name, "is required")
        return ""
    return decode_text(name, value)


def decode_text(name: str, value: Any) -> str:
    """One BYTES element as text."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(name, "must be UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise InvalidInput(name, "must be a string (BYTES)")


def _integer(inputs: dict[str, Any], name: str, default: Any, low: float, high: float) -> Any:
    value = _scalar(inputs, name)
    if value is None:
        return default
    if not isinstance(value, (int, np.integer)):
        raise InvalidInput(name, f"must be an integer in [{low}, {high}]")
    value = int(value)
    if not low <= value <= high:
        raise InvalidInput(name, f"must be in [{low}, {high}], got {value}")
    return value


def _real(inputs: dict[str, Any], name: str, default: Any, low: float, high: float) -> Any:
    value = _scalar(inputs, name)
    if value is None:
        return default
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidInput(name, f"must be a number in [{low}, {high}]")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidInput(name, f"must be a finite number in [{low}, {high}], got {value}")
    return value
