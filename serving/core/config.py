"""The pipeline's config.pbtxt parameters, read once into one typed object (`ldm export` writes
them: export/cli.py pipeline_parameters). Imports nothing from Triton.

Every parameter has its type and default here; a malformed value is refused at load naming the
parameter. The readers take the typed object: the runners (serving/models/assemble.py), the
scheduler, the request limits of each served model (serving/core/request.py RequestLimits) and the
regions' limits. Parameters written for other readers (the gateway's `models`, `native_size`,
`scheduler_config`) are left to them.
"""

from typing import Any, NoReturn
from dataclasses import dataclass, fields
import math

from families.contracts import MAX_REGIONS
from serving.core.scheduler import BatchingConfig

DEFAULT_BASE_WEIGHT = 0.2  # regions: the base prompt's share of every cell
REGION_MODES = ("latent", "attention")


@dataclass(frozen=True)
class PipelineConfig:
    # which runner serves each component (serving/models/assemble.py)
    unet: str = "bls"
    text_vae: str = "bls"
    torch_buckets: str = ""  # the torch runner's row buckets, e.g. "1,2,4,8"; empty: its defaults
    torch_compile: bool = False
    cuda_graphs: bool = True
    # batching and shutdown
    step_batching: bool = True
    max_rows: int = BatchingConfig.max_rows
    max_active: int = BatchingConfig.max_active
    max_queue: int = BatchingConfig.max_queue
    drain_grace_s: float = 120.0  # below the Deployment's terminationGracePeriodSeconds
    # request defaults and limits (per model: sizes default to each checkpoint's)
    default_size: int | None = None
    max_size: int | None = None
    default_steps: int = 25
    max_steps: int = 150
    default_guidance_scale: float | None = None  # None: each family's (SD, SDXL 5.0; Flux 3.5, FluxPipeline's)
    max_guidance_scale: float = 50.0
    default_eta: float = 0.0
    # UTF-8 bytes of one text input, refused before it is decoded or tokenized: the tokenizer's
    # lock is shared with the engine's encoding
    max_prompt_bytes: int = 4096
    default_sampler: str = ""  # `ldm serve --sampler`; empty: each checkpoint's scheduler class decides
    # LoRA adapters (serving/core/lora.py): the denoiser is exported with mixed-adapter inputs
    lora: bool = False
    lora_dir: str = ""  # adapters registered at start: every *.safetensors, named by its stem
    lora_budget_mb: int = 512  # resident adapters' matrices; idle ones beyond it are evicted
    max_loras_per_request: int = 4
    max_lora_file_mb: int = 64  # an uploaded adapter file larger than this is refused (413)
    lora_batching: str = "mixed"  # "per_set": a call holds one adapter set (a baseline, what other servers do)
    lora_columns: int = 256  # the bank's width: resident adapters' ranks summed (the torch runner's fixed bank)
    # regional prompts (serving/core/regions.py)
    max_regions: int = MAX_REGIONS
    default_base_prompt_weight: float = DEFAULT_BASE_WEIGHT
    default_region_mode: str = "latent"

    @classmethod
    def parse(cls, params: dict[str, Any]) -> "PipelineConfig":
        """From config.pbtxt's string parameters; absent or empty ones take their defaults."""
        values = {}
        for spec in fields(cls):
            raw = params.get(spec.name, "")
            if raw == "" or raw is None:
                continue
            values[spec.name] = _cast(spec.name, str(raw), spec.type)
        config = cls(**values)
        config._check()
        return config

    def batching(self) -> BatchingConfig:
        return BatchingConfig(self.max_rows, self.max_active, self.max_queue, self.step_batching)

    def _check(self) -> None:
        if not 0 <= self.drain_grace_s < math.inf:
            refuse("drain_grace_s", self.drain_grace_s, "must be a finite number >= 0")
        if self.default_region_mode not in REGION_MODES:
            refuse("default_region_mode", self.default_region_mode, f"must be one of {REGION_MODES}")
        if self.lora_batching not in ("mixed", "per_set"):
            refuse("lora_batching", self.lora_batching, "must be mixed or per_set")
        if self.max_regions < 1:
            refuse("max_regions", self.max_regions, "must be at least 1")


def config_parameter(params: dict[str, Any], key: str, cast: Any, default: Any) -> Any:
    """One parameter of another model's config.pbtxt (the unary front's) as `cast`, or `default`."""
    raw = params.get(key, "")
    return default if raw == "" else _cast(key, str(raw), cast)


def refuse(key: str, value: Any, why: str) -> NoReturn:
    raise ValueError(f"pipeline config.pbtxt parameter {key}={value!r} {why}")


def _cast(name: str, raw: str, kind: Any) -> Any:
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            refuse(name, raw, "must be true or false")
        return raw.lower() == "true"
    cast = {int | None: int, float | None: float}.get(kind, kind)
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"pipeline config.pbtxt parameter {name}={raw!r} is not a valid {cast.__name__}") from None
