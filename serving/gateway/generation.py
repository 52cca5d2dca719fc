"""What the gateway asks the pipeline for, whatever protocol the request came in: `Generation`.

Its `inputs` use the pipeline's input names (serving/core/request.py FIELDS, and the inputs
the image-conditioning and regional features add); their tensor types come from the served
model's config, which the gateway reads at start, so this module declares no types of its own.
A request that uses an input the served pipeline does not declare is UNIMPLEMENTED.

LoRA adapters (`loras: [{name, weight}]` on every front) travel as the pipeline's `lora_names`
and `lora_weights`, in the request's order; the pipeline adds the prompt's `<lora:name:weight>`
tags after them, so its error naming `loras[i]` past the request's own adapters is about a tag
of the prompt (`refused` says so).
"""

from dataclasses import dataclass, field
import re
import secrets

import numpy as np

from serving.core.errors import INTERNAL
from serving.gateway.errors import UNIMPLEMENTED, ApiError, invalid

MAX_IMAGES = 8
FORMATS = ("png", "jpeg", "webp")
MAX_SEED = 2**63 - 1
PAIRS = {"original_size": "[height, width]", "crop_top_left": "[top, left]", "target_size": "[height, width]"}
# pipeline inputs -> the GenerateRequest (and Steer) fields they come from
FIELD_NAMES = {
    "region_prompts": "regions.prompt",
    "region_negative_prompts": "regions.negative_prompt",
    "region_masks": "regions.mask",
    "lora_names": "loras",
    "lora_weights": "loras",
}
LORA_FIELD = re.compile(r"loras\[(\d+)\](\.\w+)?")

# Triton model-config data types -> numpy
NUMPY_TYPES = {
    "TYPE_STRING": np.object_,
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP32": np.float32,
}


@dataclass
class Generation:
    prompt: str
    inputs: dict = field(default_factory=dict)  # pipeline input -> str, int, float, bool, list of str, or ndarray
    n: int = 1
    seed: int | None = None  # image i uses seed + i; None: drawn at random
    output_format: str = "png"
    quality: int = 90  # JPEG / WebP
    progress_every: int = 0  # streams: a progress event every k steps (0: none)
    preview_every: int = 0
    caller: str = ""  # whose share of the pipeline it holds and whose rate limit it was charged to (ImageService.admit)
    charged: float = 0.0  # work units charged (refunded if it is refused before it runs)

    def validate(self) -> "Generation":
        """Checks what the gateway owns (the pipeline checks the rest) and draws the seed."""
        if not 1 <= self.n <= MAX_IMAGES:
            raise invalid("n", f"must be in [1, {MAX_IMAGES}], got {self.n}")
        if self.seed is None:
            self.seed = secrets.randbelow(2**31)
        if not 0 <= self.seed <= MAX_SEED - (self.n - 1):
            raise invalid("seed", f"must be in [0, {MAX_SEED - (self.n - 1)}] for n={self.n}, got {self.seed}")
        if self.output_format not in FORMATS:
            raise invalid("output_format", f"must be one of {', '.join(FORMATS)}, got {self.output_format!r}")
        if not 1 <= self.quality <= 100:
            raise invalid("quality", f"must be in [1, 100], got {self.quality}")
        interval = self.inputs.get("guidance_interval")
        if interval is not None and len(interval) != 2:  # its tensor is [2]: Triton would refuse another shape
            raise invalid(
                "guidance_interval", f"must be two numbers [lo, hi] (fractions of the run), got {len(interval)}"
            )
        for name, meaning in PAIRS.items():  # SDXL's size conditioning: INT32 [2] each
            pair = self.inputs.get(name)
            if pair is not None and len(pair) != 2:
                raise invalid(name, f"must be two integers {meaning} (pixels), got {len(pair)}")
        model = self.inputs.get("model")
        if model is not None and not isinstance(model, str):
            raise invalid("model", f"must be a string (a model's id: GET /v1/models), got {model!r}")
        for name in ("progress_every", "preview_every"):
            if getattr(self, name) < 0:
                raise invalid(name, f"must be at least 0, got {getattr(self, name)}")
        check_texts({"prompt": self.prompt, **self.inputs})
        return self

    def refused(self, error: ApiError) -> ApiError:
        """The pipeline's refusal, naming `prompt` where it is about a <lora:> tag of the prompt."""
        match = LORA_FIELD.fullmatch(error.field or "")
        if match and int(match.group(1)) >= len(self.inputs.get("lora_names", ())):
            return ApiError(
                error.code,
                f"a <lora:name:weight> tag ({error.field}: the request's loras, then the prompt's "
                f"tags): {error.message}",
                "prompt",
                error.retry_after_s,
            )
        return error

    def values(self, index: int) -> dict:
        """The pipeline inputs of image `index`, as Python values."""
        assert self.seed is not None, "validate() draws the seed"
        values = {"prompt": self.prompt, **self.inputs, "seed": self.seed + index}
        if self.progress_every:
            values["progress_every"] = self.progress_every
        if self.preview_every:
            values["preview_every"] = self.preview_every
        return values

    def check_declared(self, declared: dict) -> None:
        """UNIMPLEMENTED naming the first input the served pipeline does not take."""
        for name in self.values(0):
            if name not in declared:
                raise ApiError(
                    UNIMPLEMENTED,
                    "the served pipeline does not take this input (its model "
                    "has no such feature deployed); leave it out",
                    name,
                )

    def arrays(self, index: int, declared: dict) -> dict:
        """Named numpy arrays for image `index`, typed as the served pipeline declares them."""
        self.check_declared(declared)
        return {name: to_array(name, value, declared[name]) for name, value in self.values(index).items()}


def lora_inputs(loras: list | None) -> dict:
    """The pipeline inputs of a request's adapters, [(name, weight), ...] (none: no inputs);
    INVALID_ARG naming `loras[i].name` or `loras[i].weight` for what is not a name or a number
    (the pipeline checks the names it holds, the weights' range, NaN included, and how many)."""
    if not loras:
        return {}
    for i, (name, weight) in enumerate(loras):
        if not isinstance(name, str) or not name:
            raise invalid(f"loras[{i}].name", "must be an adapter's name (GET /v1/loras lists them)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise invalid(f"loras[{i}].weight", f"must be a number (default 1), got {weight!r}")
    return {"lora_names": [name for name, _ in loras], "lora_weights": [float(weight) for _, weight in loras]}


def check_texts(inputs: dict) -> None:
    """INVALID_ARG naming the first text that UTF-8 cannot encode: JSON may spell a lone
    surrogate (`"\\ud800"`), which Python decodes into a str that only fails when sent."""
    for name, value in inputs.items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise invalid(name, f"is not valid Unicode text: {exc.reason} at character {exc.start}") from None


def to_array(name: str, value, data_type: str) -> np.ndarray:
    dtype = NUMPY_TYPES.get(data_type)
    if dtype is None:
        raise ApiError(INTERNAL, f"the pipeline declares input {name} as {data_type}, which the gateway cannot send")
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value.astype(dtype, copy=False))
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if dtype is np.object_:
        return np.array([v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values], dtype=np.object_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)  # type: ignore[type-var]  # an integer dtype here
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise invalid(name, f"must be an integer, got {v!r}")
            if not info.min <= v <= info.max:
                raise invalid(name, f"must be in [{info.min}, {info.max}], got {v}")
    return np.array(values, dtype=dtype)
