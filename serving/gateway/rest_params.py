"""The REST parameters of /v1/images/generations (JSON) and /v1/images/edits (multipart), declared
once: the parser below and the OpenAPI document (serving/gateway/openapi.py) both read PARAMS.

OpenAI's Images API parameters keep their meaning: `model` picks a served model
(serving/gateway/models.py: GET /v1/models lists them; OpenAI's own model names mean the
default model); the ones that do not change what this server makes (quality, moderation, style,
user, ...) are accepted and ignored. Our extensions (negative_prompt, seed, steps,
guidance_scale, eta, timeout_s, sampler, sigma_schedule, guidance_interval, SDXL's
original_size, crop_top_left, target_size; for edits strength, mask_blur, keep_unmasked) pass
through to the pipeline input of the same name, whose limits the served pipeline checks.
`loras` ([{name, weight}], GET /v1/loras lists the names) becomes the pipeline's lora_names and
lora_weights (serving/gateway/generation.py lora_inputs).
"""

from dataclasses import dataclass
import json
import math
import re

from serving.core.samplers import SIGMA_SCHEDULES
from serving.gateway.errors import invalid
from serving.gateway.generation import FORMATS, MAX_IMAGES

GENERATIONS, EDITS = "generations", "edits"
# ASCII digits only (str.isdigit takes `²`, which int() refuses), and few of them: the model's
# limits are far below 5 digits, and int() refuses thousands
SIZE = re.compile(r"([0-9]{1,5})[xX]([0-9]{1,5})")
BOTH = (GENERATIONS, EDITS)


@dataclass(frozen=True)
class Param:
    name: str
    # string | integer | number | boolean | interval (two numbers [lo, hi]) | pair (two integers) | loras
    # ([{name, weight}]) | file | any
    kind: str
    description: str
    routes: tuple = BOTH
    enum: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    default: object = None
    required: bool = False
    to_pipeline: bool = False  # sent as the pipeline input of the same name
    extension: bool = False  # ours, not in OpenAI's API


MAX_PAIR = 16384  # pixels: SDXL's size conditioning (the pipeline's MAX_CONDITIONING_SIZE)
PAIRS = ("original_size", "crop_top_left", "target_size")

PARAMS = (
    Param("prompt", "string", "What to draw.", required=True),
    Param(
        "model",
        "string",
        "The served model (GET /v1/models lists them); default: the server's default model, "
        "which OpenAI's own model names (dall-e-2, dall-e-3, gpt-image-*) also mean. Any other name is 404.",
        to_pipeline=True,
    ),
    Param(
        "image",
        "file",
        "The image to edit: PNG, JPEG or WebP. Transparent pixels are repainted when no mask is given.",
        routes=(EDITS,),
        required=True,
    ),
    Param(
        "mask",
        "file",
        "PNG/WebP whose fully transparent pixels (alpha 0) mark where to repaint (OpenAI's rule); "
        "without alpha, luminance 255 = repaint. Resized to the image.",
        routes=(EDITS,),
    ),
    Param("n", "integer", "Number of images; image i uses seed + i.", minimum=1, maximum=MAX_IMAGES, default=1),
    Param(
        "size",
        "string",
        "`WIDTHxHEIGHT` in pixels (multiples of the model's size multiple, within its maximum), "
        "or `auto` for the model's native size (edits: the image's size).",
        default="auto",
    ),
    Param(
        "response_format",
        "string",
        "Only `b64_json`: this server stores no images to link to (`url` is refused).",
        enum=("b64_json",),
        default="b64_json",
    ),
    Param("output_format", "string", "Encoding of the returned images.", enum=FORMATS, default="png"),
    Param("output_compression", "integer", "JPEG/WebP quality, 0-100.", minimum=0, maximum=100, default=90),
    Param(
        "stream", "boolean", "Server-sent events: partial images, then one completed event per image.", default=False
    ),
    Param(
        "partial_images",
        "integer",
        "With stream: previews to send per image before it completes (coarse, from the running latents).",
        minimum=0,
        maximum=3,
        default=0,
    ),
    Param(
        "background",
        "string",
        "Only opaque backgrounds are made (`transparent` is refused).",
        enum=("auto", "opaque"),
        default="auto",
    ),
    Param("negative_prompt", "string", "What to steer away from.", to_pipeline=True, extension=True),
    Param(
        "seed",
        "integer",
        "Seed of the first image (random when absent); same request and seed, same image.",
        minimum=0,
        extension=True,
    ),
    Param("steps", "integer", "Denoising steps (the pipeline's default and limits).", to_pipeline=True, extension=True),
    Param(
        "guidance_scale",
        "number",
        "Classifier-free guidance scale; <= 1 disables guidance.",
        to_pipeline=True,
        extension=True,
    ),
    Param("eta", "number", "DDIM eta in [0, 1].", to_pipeline=True, extension=True),
    Param(
        "timeout_s",
        "number",
        "Give up (503) when the images are not ready within this many seconds.",
        to_pipeline=True,
        extension=True,
    ),
    Param(
        "sampler",
        "string",
        "Sampler: ddim, euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde, unipc, lcm, "
        'flow_match_euler, or an A1111 name ("DPM++ 2M Karras", "Euler a", ...), any case; GET /v1/samplers lists '
        "them and which fit the served model. Default: the server's.",
        to_pipeline=True,
        extension=True,
    ),
    Param(
        "sigma_schedule",
        "string",
        "Sigma spacing of the Euler, DPM++ and UniPC samplers (default: the one the "
        "sampler's name implies, else `default`).",
        enum=SIGMA_SCHEDULES,
        to_pipeline=True,
        extension=True,
    ),
    Param(
        "guidance_interval",
        "interval",
        "[lo, hi]: classifier-free guidance only during this part of the run "
        "(fractions of the steps, 0 <= lo < hi <= 1); default the whole run. In a form: `lo,hi`.",
        minimum=0,
        maximum=1,
        to_pipeline=True,
        extension=True,
    ),
    Param(
        "original_size",
        "pair",
        "SDXL models only: [height, width] the image is said to have had before cropping "
        "(pixels; SDXL's size conditioning). Default: the output's size. In a form: `height,width`.",
        minimum=1,
        maximum=MAX_PAIR,
        to_pipeline=True,
        extension=True,
    ),
    Param(
        "crop_top_left",
        "pair",
        "SDXL models only: [top, left] of the crop (pixels). Default: [0, 0]. In a form: `top,left`.",
        minimum=0,
        maximum=MAX_PAIR,
        to_pipeline=True,
        extension=True,
    ),
    Param(
        "target_size",
        "pair",
        "SDXL models only: [height, width] the image is meant for (pixels). Default: the "
        "output's size. In a form: `height,width`.",
        minimum=1,
        maximum=MAX_PAIR,
        to_pipeline=True,
        extension=True,
    ),
    Param(
        "loras",
        "loras",
        'LoRA adapters to apply, [{"name": ..., "weight": ...}] (GET /v1/loras lists the '
        "names; weight in [-4, 4], default 1), at most the server's per-request limit (default 4) together with the "
        "prompt's A1111 tags `<lora:name:weight>`, which also work. In a form: `name:weight,name:weight` or that JSON "
        "array.",
        extension=True,
    ),
    Param(
        "strength",
        "number",
        "How much of the schedule to re-run over the image, (0, 1].",
        routes=(EDITS,),
        to_pipeline=True,
        extension=True,
    ),
    Param(
        "mask_blur", "integer", "Blur of the mask's edge, pixels.", routes=(EDITS,), to_pipeline=True, extension=True
    ),
    Param(
        "keep_unmasked",
        "boolean",
        "Paste the unmasked pixels of the image back after decoding.",
        routes=(EDITS,),
        to_pipeline=True,
        extension=True,
    ),
) + tuple(
    Param(name, "any", "Accepted for compatibility with OpenAI's API; does not change what this server makes.")
    for name in ("quality", "moderation", "style", "user", "safety_identifier", "input_fidelity")
)
BY_NAME = {p.name: p for p in PARAMS}


def params_of(route: str) -> list:
    return [p for p in PARAMS if route in p.routes]


def parse(values: dict, route: str, from_form: bool) -> dict:
    """Typed values of the known parameters; 400 naming the first unknown, missing or bad one."""
    known = {p.name: p for p in params_of(route)}
    for name in values:
        if name not in known:
            raise invalid(name, f"unknown parameter for /v1/images/{route}")
    parsed = {}
    for name, param in known.items():
        if name not in values or values[name] is None:
            if param.required:
                raise invalid(name, "is required")
            continue
        parsed[name] = _typed(param, values[name], from_form)
    return parsed


def _typed(param: Param, value, from_form: bool):
    name, kind = param.name, param.kind
    if kind in ("any", "file"):
        return value
    if kind == "interval":
        return _interval(param, value, from_form)
    if kind == "pair":
        return _pair(param, value, from_form)
    if kind == "loras":
        return parse_loras(value, from_form)
    if from_form and kind != "string":
        value = _from_text(param, value)
    if kind == "string":
        if not isinstance(value, str):
            raise invalid(name, "must be a string")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise invalid(name, "must be true or false")
    elif kind == "integer":
        if isinstance(value, float) and value.is_integer():  # JSON does not tell 10 from 10.0, nor does JSON Schema
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(name, "must be an integer")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise invalid(name, "must be a finite number")
        value = float(value)
    if param.enum and value not in param.enum:
        raise invalid(name, f"must be one of {', '.join(map(str, param.enum))}, got {value!r}. {param.description}")
    low, high = param.minimum, param.maximum
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise invalid(name, f"must be {allowed}, got {value}")
    return value


def _interval(param: Param, value, from_form: bool) -> list:
    """[lo, hi] from a JSON array, or in a form from `lo,hi` (or the field twice, `name[]`); the
    pipeline checks the range."""
    if from_form:
        texts = value if isinstance(value, list) else str(value).strip().strip("[]").split(",")
        try:
            value = [float(t) for t in texts]
        except (TypeError, ValueError):
            raise invalid(param.name, f"must be two numbers lo,hi, got {value!r}") from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
    ):
        raise invalid(param.name, f"must be two finite numbers [lo, hi], got {value!r}")
    return [float(v) for v in value]


def _pair(param: Param, value, from_form: bool) -> list:
    """[a, b], two integers within the parameter's bounds, from a JSON array, or in a form from
    `a,b` (or the field twice)."""
    if from_form:
        texts = value if isinstance(value, list) else str(value).strip().strip("[]").split(",")
        try:
            value = [int(str(t).strip()) for t in texts]
        except (TypeError, ValueError):
            raise invalid(param.name, f"must be two integers a,b, got {value!r}") from None
    if isinstance(value, list):
        value = [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
    if (
        not isinstance(value, list)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
    ):
        raise invalid(param.name, f"must be two integers [a, b], got {value!r}")
    if not all(param.minimum <= v <= param.maximum for v in value):
        raise invalid(param.name, f"must be two integers in [{param.minimum}, {param.maximum}], got {value}")
    return value


def parse_loras(value, from_form: bool) -> list:
    """[(name, weight), ...] from a JSON array of {name, weight} objects (weight default 1), or in
    a form from `name:weight,name:weight` (weight optional), a JSON array, or the field repeated;
    400 naming `loras[i].name` / `loras[i].weight`, or `loras`."""
    if from_form:
        texts = value if isinstance(value, list) else [value]
        items = []
        for text in texts:
            if not isinstance(text, str):
                raise invalid("loras", "must be a form field, not a file")
            if text.strip().startswith("["):
                try:
                    items += json.loads(text)
                except (json.JSONDecodeError, TypeError, RecursionError):
                    raise invalid("loras", f"is not a JSON array of {{name, weight}}: {text[:60]!r}") from None
                continue
            for entry in filter(None, (t.strip() for t in text.split(","))):
                adapter, _, amount = entry.rpartition(":") if ":" in entry else (entry, "", "")
                try:
                    items.append({"name": adapter, **({"weight": float(amount)} if amount else {})})
                except ValueError:
                    raise invalid(f"loras[{len(items)}].weight", f"must be a number, got {amount!r}") from None
        value = items
    if not isinstance(value, list):
        raise invalid("loras", "must be an array of {name, weight} objects")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise invalid(f"loras[{i}]", "must be an object {name, weight}")
        unknown = sorted(set(item) - {"name", "weight"})
        if unknown:
            raise invalid(f"loras[{i}].{unknown[0]}", "unknown; an adapter takes name and weight")
        name, weight = item.get("name"), item.get("weight", 1.0)
        if not isinstance(name, str) or not name:
            raise invalid(f"loras[{i}].name", "must be an adapter's name (GET /v1/loras lists them)")
        if weight is None:
            weight = 1.0
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise invalid(f"loras[{i}].weight", f"must be a number (default 1), got {weight!r}")
        out.append((name, float(weight)))
    return out


def _from_text(param: Param, text: str):
    if not isinstance(text, str):
        raise invalid(param.name, "must be a form field, not a file")
    try:
        if param.kind == "integer":
            return int(text)
        if param.kind == "number":
            return float(text)
    except ValueError:
        raise invalid(
            param.name, f"must be a{'n integer' if param.kind == 'integer' else ' number'}, got {text!r}"
        ) from None
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise invalid(param.name, f"must be true or false, got {text!r}")


def parse_size(text: str) -> tuple | None:
    """(height, width) from `WIDTHxHEIGHT`, or None for `auto`."""
    if text == "auto":
        return None
    match = SIZE.fullmatch(text)
    if match is None:
        raise invalid("size", f"must be WIDTHxHEIGHT in pixels (e.g. 64x64) or auto, got {text[:40]!r}")
    width, height = map(int, match.groups())
    return height, width
