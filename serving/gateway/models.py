"""The models the served pipeline serves (`GET /v1/models`, the gRPC `ListModels`) and which one a
request's `model` names.

`ldm export` writes the pipeline's config parameter `models` (export/repository.py model_list):
a JSON list of {id, family, default, native_size, max_size, tasks, scheduler_config}, the default
model first. A pipeline exported before there could be several models has no such parameter: it
serves one model, listed here as `default` from the parameters it has (native_size,
scheduler_config).

A request's `model`: empty or absent is the default model; a served model's id is that model;
OpenAI's own image model names (dall-e-2, dall-e-3, gpt-image-*: what OpenAI clients and SDK
wrappers send by default) also mean the default model, unless a served model has that name, so
clients written for OpenAI keep working; any other name is NOT_FOUND naming it. Before
several models could be served, the gateway accepted any `model` and ignored it.
"""

from dataclasses import dataclass, replace
import functools
import json
import re

from serving.core.samplers.registry import served_default
from serving.gateway.errors import NOT_FOUND, ApiError
from serving.gateway.pipeline import PipelineModel

OWNER = "ldm-serving"
DEFAULT_ID = "default"  # the one model of an export without the `models` parameter
# OpenAI's image models (openai.types.ImageModel and its predecessors): the default model here
OPENAI_IMAGE_MODELS = re.compile(r"(dall-e-[0-9]+|gpt-image-[0-9a-z.-]+|chatgpt-image-[0-9a-z.-]+)", re.IGNORECASE)


@dataclass(frozen=True)
class ListedModel:
    """A served model as the API lists it (GET /v1/models, the gRPC ListModels): the gateway's view
    of the pipeline's `models` table (serving/core/service.py ServedModel is the pipeline's own)."""

    id: str
    family: str
    default: bool
    native_size: int
    max_size: int
    tasks: tuple
    scheduler_config: dict | None  # None: the export does not say (samplers' fit unknown)
    default_sampler: tuple | None  # (sampler, sigma schedule) of a request naming none; None: unknown


def served_models(model: PipelineModel | None) -> list:
    """The served pipeline's models, the default first; [] while it is not known."""
    if model is None:
        return []
    p = model.parameters
    return list(
        _parse(
            p.get("models", ""),
            p.get("default_sampler", ""),
            p.get("scheduler_config", ""),
            model.parameter("native_size", int, 0),
            model.parameter("max_size", int, 0),
            "init_image" in model.inputs,
        )
    )


@functools.lru_cache(maxsize=16)  # read on every request: parsed once per served pipeline
def _parse(
    table: str, configured: str, scheduler_config: str | None, native: int, max_size: int, image_input: bool
) -> tuple:
    try:
        entries = json.loads(table or "null")
    except ValueError:
        entries = None
    if not isinstance(entries, list) or not entries:  # an export of one model, before the table
        try:
            noise_schedule = json.loads(scheduler_config or "null")
        except ValueError:
            noise_schedule = None
        entries = [
            {
                "id": DEFAULT_ID,
                "family": "sd",
                "default": True,
                "native_size": native,
                "max_size": max_size or 2 * native,
                "scheduler_config": noise_schedule,
                "tasks": ["txt2img"] + (["img2img", "inpaint"] if image_input else []),
            }
        ]
    models = [
        ListedModel(
            id=str(e["id"]),
            family=str(e.get("family", "sd")),
            default=bool(e.get("default")),
            native_size=int(e.get("native_size") or 0),
            max_size=int(e.get("max_size") or 0),
            tasks=tuple(e.get("tasks", ())),
            scheduler_config=e.get("scheduler_config") if isinstance(e.get("scheduler_config"), dict) else None,
            default_sampler=_default_sampler(configured, e.get("scheduler_config")),
        )
        for e in entries
        if isinstance(e, dict) and "id" in e
    ]
    if models and not any(m.default for m in models):  # the first is the default (export/repository.py)
        models[0] = replace(models[0], default=True)
    return tuple(sorted(models, key=lambda m: not m.default))


def _default_sampler(configured: str, scheduler_config) -> tuple | None:
    """What a request naming no sampler gets on a model with this scheduler config (the pipeline's
    own rule, serving/core/samplers/registry.py); None when it cannot be said."""
    if not isinstance(scheduler_config, dict):
        return None
    try:
        return served_default(configured, scheduler_config)
    except ValueError:  # the pipeline refuses to load with it; nothing to say here
        return None


def find(models: list, name: str) -> ListedModel:
    """The served model `name` names; NOT_FOUND naming it. The default model for "" and for
    OpenAI's image model names no served model has."""
    for served in models:
        if served.id == name:
            return served
    if not name or OPENAI_IMAGE_MODELS.fullmatch(name):
        return next(m for m in models if m.default)
    raise not_found(models, name)


def lookup(models: list, name: str) -> ListedModel:
    """A served model by its id only (GET /v1/models/{id}): NOT_FOUND naming anything else."""
    for served in models:
        if served.id == name:
            return served
    raise not_found(models, name)


def not_found(models: list, name: str) -> ApiError:
    served = ", ".join(m.id for m in models) or "none yet"
    return ApiError(NOT_FOUND, f"no model named {name[:200]!r}; this server serves {served} (GET /v1/models)", "model")


def resolve(inputs: dict, pipeline_model: PipelineModel) -> ListedModel:
    """The model a generation's inputs name (its `model`, if any, taken out); puts back the
    served model's id when the request named one and the pipeline takes `model`, so that the
    pipeline runs it; the default model otherwise goes unnamed (any pipeline serves it)."""
    models = served_models(pipeline_model)
    name = inputs.pop("model", None) or ""
    served = find(models, name)
    if name == served.id and "model" in pipeline_model.inputs:
        inputs["model"] = served.id
    return served


def rest_entry(served: ListedModel, created: int) -> dict:
    """One model in OpenAI's model object shape, with this server's facts beside."""
    sampler, schedule = served.default_sampler or (None, None)
    return {
        "id": served.id,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "family": served.family,
        "native_size": served.native_size,
        "max_size": served.max_size,
        "tasks": list(served.tasks),
        "default_sampler": sampler,
        "default_sigma_schedule": schedule,
        "default": served.default,
    }


def rest_list(models: list, created: int) -> dict:
    return {"object": "list", "data": [rest_entry(m, created) for m in models]}
