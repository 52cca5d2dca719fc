"""What `GET /v1/samplers` and the gRPC `ListSamplers` answer: every sampler the pipeline knows
(serving/core/samplers: name, description, A1111 names, sigma schedules, the models it fits,
the request fields it reads), whether it fits a served model, and that model's default.

A served model is known from the pipeline's config parameters, which the gateway reads at
start (serving/gateway/models.py): each model's scheduler config (written by `ldm export`) and
`default_sampler` (`ldm serve --sampler`). The list is for the model a request names
(`?model=` / ListSamplersRequest.model; none: the default model). A repository exported before
samplers has no scheduler config: the list then leaves fits_served_model out."""

from dataclasses import dataclass

from serving.core.samplers import describe_samplers
from serving.core.samplers.registry import resolve_name
from serving.gateway.models import find, served_models
from serving.gateway.pipeline import PipelineModel


@dataclass(frozen=True)
class ServedSamplers:
    samplers: list  # describe_samplers' dicts
    default: tuple | None  # (sampler, sigma schedule) of a request naming none; None: not known


def served_samplers(model: PipelineModel | None, name: str = "") -> ServedSamplers:
    """The samplers for the served model `name` names (models.find: NOT_FOUND for an unknown
    one; "": the default model)."""
    models = served_models(model)
    if not models:  # the pipeline is not known yet
        return ServedSamplers(describe_samplers(None), None)
    served = find(models, name)
    default = served.default_sampler
    assert model is not None  # it listed models
    configured = model.parameters.get("default_sampler", "")
    if served.scheduler_config is None and configured:  # an export without its scheduler config: the name alone
        try:
            default = resolve_name(configured, None)
        except ValueError:
            default = None
    return ServedSamplers(describe_samplers(served.scheduler_config), default)


def rest_list(served: ServedSamplers) -> dict:
    """OpenAI's list shape: {"object": "list", "data": [...]} and the served default."""
    default = served.default or (None, None)
    return {
        "object": "list",
        "data": [{"object": "sampler", **entry} for entry in served.samplers],
        "default_sampler": default[0],
        "default_sigma_schedule": default[1],
    }
