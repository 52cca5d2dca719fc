"""What `GET /v1/samplers` and the gRPC `ListSamplers` answer: every sampler the pipeline knows
(serving/core/samplers: name, description, A1111 names, sigma schedules, the models it fits,
the request fields it reads), whether it fits the served model, and the served default.

The served model is known from the pipeline's config parameters, which the gateway reads at
start: `scheduler_config` (the checkpoint's scheduler config, written by `ldm export`) and
`default_sampler` (`ldm serve --sampler`). A repository exported before samplers has no
scheduler_config: the list then leaves fits_served_model out."""
from dataclasses import dataclass
import json

from serving.core.samplers import describe_samplers
from serving.core.samplers.registry import resolve_name, served_default
from serving.gateway.pipeline import PipelineModel


@dataclass(frozen=True)
class ServedSamplers:
    samplers: list  # describe_samplers' dicts
    default: tuple | None  # (sampler, sigma schedule) of a request naming none; None: not known


def served_samplers(model: PipelineModel | None) -> ServedSamplers:
    scheduler = None
    default = None
    if model is not None:
        try:
            scheduler = json.loads(model.parameters.get("scheduler_config") or "null")
        except ValueError:
            scheduler = None
        if not isinstance(scheduler, dict):
            scheduler = None
        configured = model.parameters.get("default_sampler", "")
        try:
            if scheduler is not None:
                default = served_default(configured, scheduler)
            elif configured:  # an export without its scheduler config: the name alone
                default = resolve_name(configured, None)
        except ValueError:  # the pipeline refuses to load with it; nothing to say here
            default = None
    return ServedSamplers(describe_samplers(scheduler), default)


def rest_list(served: ServedSamplers) -> dict:
    """OpenAI's list shape: {"object": "list", "data": [...]} and the served default."""
    default = served.default or (None, None)
    return {"object": "list", "data": [{"object": "sampler", **entry} for entry in served.samplers],
            "default_sampler": default[0], "default_sigma_schedule": default[1]}
