"""The pipeline behind the Triton `pipeline` model, as plain Python: turns named input arrays
into validated jobs for the engine. The Triton model only adapts tensors and response senders."""
from dataclasses import dataclass, replace
import json
from pathlib import Path
import secrets

from serving.core.engine import Engine
from serving.core.errors import INVALID_ARG, UNAVAILABLE
from serving.core.job import Job
from serving.core.preview import LatentPreview
from serving.core.regional_prompt import check_regional_job
from serving.core.request import InvalidInput, Limits, config_parameter, parse_request
from serving.core.runner import Runner
from serving.core.sampler import DDIMSchedule
from serving.core.scheduler import QueueFull, SchedulerConfig, StepScheduler
from serving.core.text import PromptTokenizer


@dataclass(frozen=True)
class PipelineAssets:
    """What `ldm export` writes into pipeline/1/: facts about the checkpoint and its tokenizer."""

    info: dict
    tokenizer_dir: Path
    scheduler_config: dict

    @classmethod
    def read(cls, version_dir) -> "PipelineAssets":
        version_dir = Path(version_dir)
        return cls(
            info=json.loads((version_dir / "pipeline.json").read_text()),
            tokenizer_dir=version_dir / "tokenizer",
            scheduler_config=json.loads((version_dir / "scheduler_config.json").read_text()),
        )


def scheduler_config(params: dict) -> SchedulerConfig:
    defaults = SchedulerConfig()
    step_batching = params.get("step_batching", "true").lower()
    if step_batching not in ("true", "false"):
        raise ValueError(f"pipeline config.pbtxt parameter step_batching={step_batching!r} must be true or false")
    return SchedulerConfig(
        max_rows=config_parameter(params, "max_rows", int, defaults.max_rows),
        max_active=config_parameter(params, "max_active", int, defaults.max_active),
        max_queue=config_parameter(params, "max_queue", int, defaults.max_queue),
        step_batching=step_batching == "true",
    )


class PipelineService:
    def __init__(self, assets: PipelineAssets, params: dict, models):
        self.limits = Limits.from_parameters(params, assets.info)
        self.tokenizer = PromptTokenizer(assets.tokenizer_dir, self.limits.max_prompt_tokens)
        runner = Runner(
            models,
            DDIMSchedule.from_config(assets.scheduler_config),
            self.tokenizer,
            latent_channels=int(assets.info["latent_channels"]),
            vae_factor=int(assets.info["vae_factor"]),
        )
        preview = LatentPreview.from_info(assets.info)
        config = scheduler_config(params)
        row_cap = getattr(models, "row_cap", None)  # what the UNet's device can serve (GPU memory plan)
        if row_cap is not None and row_cap < config.max_rows:
            config = replace(config, max_rows=row_cap)
        self.engine = Engine(runner, StepScheduler(config), preview=preview)
        self.engine.stats.row_cap = config.max_rows

    def start(self) -> "PipelineService":
        self.engine.start()
        return self

    def stop(self) -> None:
        self.engine.stop()

    def submit(self, inputs: dict, sink) -> None:
        """Validates and queues one request; a rejected request gets its error through `sink`."""
        try:
            request = parse_request(inputs, self.limits, default_seed=secrets.randbelow(2**31))
            self.tokenizer.check("prompt", request.prompt)
            self.tokenizer.check("negative_prompt", request.negative_prompt)
            job = Job(request, sink, variant=request.regions.unet_variant if request.regions else "base")
            check_regional_job(job, self.tokenizer.check, self.engine.scheduler.config.max_rows)
        except InvalidInput as exc:
            sink.fail(INVALID_ARG, str(exc))
            return
        try:
            self.engine.submit(job)
        except QueueFull as exc:
            sink.fail(UNAVAILABLE, f"server overloaded, retry later: {exc}")
