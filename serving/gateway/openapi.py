"""The OpenAPI 3.1 document of the REST front, built from the parameter table
(serving/gateway/rest_params.py) and, for the live generations, from the GenerateRequest
message their body spells (serving/gateway/rest_live.py), so the document and the parsers
cannot disagree; the served pipeline's own limits (steps, guidance scale, regions: its config's
parameters) are declared from the model the gateway read at start, when it has one.

Every status a route answers is declared; each server-sent event of the streams has its schema
(its name and its JSON data: `sse`), and the answer of
`POST /v1/generations` links to its steer and DELETE by its X-Generation-Id header.
tests/gateway/test_gateway_openapi.py runs a schema-driven fuzzer (schemathesis) against a real gateway
with this document."""

from typing import Any
from google.protobuf.descriptor import FieldDescriptor

from serving.core.lora import DEFAULT_MAX_PER_REQUEST, MAX_WEIGHT
from families.contracts import MAX_REGIONS
from serving.gateway.generation import FORMATS, MAX_SEED, PAIRS
from serving.gateway.protos import images_pb2
from serving.gateway.rest_params import EDITS, GENERATIONS, SIZE, params_of

KINDS: dict[str, dict[str, Any]] = {
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "file": {"type": "string", "format": "binary"},
    "any": {},
    "interval": {
        "type": "array",
        "items": {"type": "number", "minimum": 0, "maximum": 1},
        "minItems": 2,
        "maxItems": 2,
    },
    "pair": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
    "loras": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1, "description": "an adapter's id (GET /v1/loras)"},
                "weight": {"type": "number", "minimum": -MAX_WEIGHT, "maximum": MAX_WEIGHT, "default": 1},
            },
        },
    },
}
ERROR = {"$ref": "#/components/schemas/Error"}
SIZE_PATTERN = f"^(auto|{SIZE.pattern})$"
TEXT = {"type": "string", "pattern": r"\S", "description": "holds a visible character"}
# what each error status means; a route lists those it answers
MEANINGS = {
    "400": "a parameter is missing, malformed or out of range (`param` names it)",
    "401": "API key missing or unknown (when the server has keys)",
    "403": "a browser request from another origin, or to a Host name this server does not answer (`param`: Origin or Host)",
    "404": "no such generation (unknown, forgotten, or another key's), or no served model of that name (`param`: model)",
    "409": "the generation has finished",
    "413": "body or an image over the server's limits",
    "415": "the body is not declared `application/json`",
    "429": "rate limit reached; retry after Retry-After",
    "499": "cancelled (by DELETE) before it started",
    "500": "the gateway or the pipeline failed on this request; `message` carries the request id",
    "501": "the served pipeline does not take an input the request uses",
    "503": "not ready, queue full, shutting down, timeout_s passed, or the replica running it is unreachable; "
    "retry after Retry-After",
}
RETRY = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
REQUEST_ID = {"X-Request-Id": {"schema": {"type": "string"}, "description": "the request's id (also in the logs)"}}


def _errors(*codes, meanings: dict | None = None) -> dict:
    """The error answers of `codes`, described by MEANINGS or, for a route's own, `meanings`."""
    answers = {}
    for code in codes:
        headers = {**REQUEST_ID, **(RETRY if code in ("429", "503") else {})}
        answers[code] = {
            "description": (meanings or {}).get(code, MEANINGS[code]),
            "headers": headers,
            "content": {"application/json": {"schema": ERROR}},
        }
    return answers


def _limits(model) -> dict:
    """JSON-schema limits of the pipeline inputs, from the served model's parameters."""

    def parameter(key, cast, default):
        return model.parameter(key, cast, default) if model is not None else default

    return {
        "steps": {"minimum": 1, "maximum": parameter("max_steps", int, 150)},
        "guidance_scale": {"minimum": 0, "maximum": parameter("max_guidance_scale", float, 50.0)},
        "eta": {"minimum": 0, "maximum": 1},
        "timeout_s": {"minimum": 0, "maximum": 3600},
        "strength": {"exclusiveMinimum": 0, "maximum": 1},
        "seed": {"minimum": 0, "maximum": MAX_SEED},
        "quality": {"minimum": 1, "maximum": 100},
        "progress_every": {"minimum": 0, "maximum": parameter("max_steps", int, 150)},
        "preview_every": {"minimum": 0, "maximum": parameter("max_steps", int, 150)},
        "regions": {"maxItems": parameter("max_regions", int, MAX_REGIONS)},
        "loras": {"maxItems": parameter("max_loras_per_request", int, DEFAULT_MAX_PER_REQUEST)},
        "weight": {"minimum": -MAX_WEIGHT, "maximum": MAX_WEIGHT},  # a Lora's (GenerateRequest.loras)
        **{name: {"minItems": 2, "maxItems": 2} for name in PAIRS},  # SDXL's [height, width], [top, left]
        **({"model": {"examples": _served_ids(model)}} if _served_ids(model) else {}),
        "prompt": TEXT,
    }


def _schema(param, limits: dict, nullable: bool) -> dict:
    schema = dict(KINDS[param.kind], description=param.description)
    if param.kind == "pair":
        schema["items"] = {"type": "integer", "minimum": param.minimum, "maximum": param.maximum}
    bounds = () if param.kind in ("interval", "pair") else (("minimum", param.minimum), ("maximum", param.maximum))
    for key, value in (("enum", list(param.enum) or None), *bounds, ("default", param.default)):
        if value is not None:
            schema[key] = value
    if param.to_pipeline or param.name == "prompt" or param.kind == "loras":
        schema.update({k: v for k, v in limits.get(param.name, {}).items() if k != "description"})
    if param.name == "size":
        schema["pattern"] = SIZE_PATTERN
    if param.extension:
        schema["x-ldm-extension"] = True
    return _nullable(schema) if nullable and not param.required and "type" in schema else schema


def _nullable(schema: dict) -> dict:
    """An optional field may be null, which the parsers read as absent."""
    if "enum" in schema:
        return {**schema, "type": [schema["type"], "null"], "enum": [*schema["enum"], None]}
    return {**schema, "type": [schema["type"], "null"]}


def _body(route: str, limits: dict) -> dict:
    params = params_of(route)
    # JSON may say null (read as absent); a form field is one text each, never null
    properties = {p.name: _schema(p, limits, nullable=route == GENERATIONS) for p in params}
    if route == EDITS:
        properties.update({p.name: {**properties[p.name], "type": "string"} for p in params if p.kind == "any"})
        properties.update(
            {
                p.name: {"type": "string", "description": p.description, "x-ldm-extension": True}
                for p in params
                if p.kind == "loras"
            }
        )
    body = {
        "type": "object",
        "additionalProperties": False,
        "required": [p.name for p in params if p.required],
        "properties": properties,
    }
    if route == GENERATIONS:  # previews are streamed: partial_images > 0 needs stream: true
        body["if"] = {
            "required": ["partial_images"],
            "properties": {"partial_images": {"type": "integer", "minimum": 1}},
        }
        body["then"] = {"required": ["stream"], "properties": {"stream": {"const": True}}}
    return body


def sse(events: dict) -> dict:
    """The schema of one server-sent event (OpenAPI 3.1: a text/event-stream's `schema` describes
    each event): its name, and its data, JSON of the event's own schema."""
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"const": name},
                    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": schema},
                },
            }
            for name, schema in events.items()
        ]
    }


def _event(type_name: str, properties: dict, required: list) -> dict:
    return {
        "type": "object",
        "required": ["type", *required],
        "properties": {"type": {"const": type_name}, **properties},
    }


def _image_events(event: str) -> dict:
    common = {
        "created_at": {"type": "integer"},
        "background": {"const": "opaque"},
        "quality": {"const": "auto"},
        "image_index": {"type": "integer", "minimum": 0},
        "b64_json": {"type": "string"},
    }
    return {
        f"{event}.partial_image": _event(
            f"{event}.partial_image",
            {**common, "partial_image_index": {"type": "integer", "minimum": 0}, "output_format": {"const": "png"}},
            ["b64_json", "partial_image_index", "image_index"],
        ),
        f"{event}.completed": _event(
            f"{event}.completed",
            {
                **common,
                "seed": {"type": "integer"},
                "size": {"type": "string"},
                "output_format": {"enum": list(FORMATS)},
            },
            ["b64_json", "seed", "size", "output_format", "image_index"],
        ),
        "error": ERROR,
    }


LIVE_EVENTS = {
    "generation.created": {
        "type": "object",
        "required": ["id", "seed", "total_steps"],
        "properties": {
            "id": {"type": "string"},
            "seed": {"type": "integer"},
            "total_steps": {"type": "integer", "minimum": 1},
        },
    },
    "generation.progress": {
        "type": "object",
        "required": ["id", "step", "total_steps"],
        "properties": {
            "id": {"type": "string"},
            "step": {"type": "integer", "minimum": 0},
            "total_steps": {"type": "integer", "minimum": 1},
            "preview_b64": {"type": "string", "description": "PNG, base64"},
        },
    },
    "generation.steered": {
        "type": "object",
        "required": ["id", "steer_id", "step"],
        "properties": {
            "id": {"type": "string"},
            "steer_id": {"type": "integer", "minimum": 1},
            "step": {"type": "integer", "minimum": 0, "description": "0-based index of the first step that used it"},
        },
    },
    "generation.completed": {
        "type": "object",
        "required": ["id", "b64_json", "seed", "output_format", "timings"],
        "properties": {
            "id": {"type": "string"},
            "b64_json": {"type": "string"},
            "seed": {"type": "integer"},
            "output_format": {"enum": list(FORMATS)},
            "timings": {
                "type": "object",
                "properties": {"total_s": {"type": "number"}, "first_step_s": {"type": ["number", "null"]}},
            },
        },
    },
    "error": ERROR,
}


def _operation(route: str, summary: str, content_type: str, event: str) -> dict:
    statuses = (
        ("400", "401", "403", "404", "413", "415", "429", "500", "501", "503")
        if route == GENERATIONS
        else ("400", "401", "403", "404", "413", "429", "500", "501", "503")
    )
    return {
        "summary": summary,
        "operationId": f"images_{route}",
        "requestBody": {
            "required": True,
            "content": {content_type: {"schema": {"$ref": f"#/components/schemas/{route.title()}Request"}}},
        },
        "responses": {
            "200": {
                "description": f"the images; with stream: server-sent events `{event}.partial_image`, "
                f"`{event}.completed` (one per image), or `error`",
                "headers": REQUEST_ID,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ImagesResponse"}},
                    "text/event-stream": {"schema": sse(_image_events(event))},
                },
            },
            **_errors(*statuses),
        },
    }


PROTO_KINDS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    FieldDescriptor.TYPE_UINT64: {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}


def _message_schema(message, limits: dict, skip=()) -> dict:
    from serving.gateway.rest_live import ENUMS

    properties = {}
    for f in message.fields:
        if f.name in skip:
            continue
        if f.name in ENUMS:
            schema = {"type": "string", "enum": list(ENUMS[f.name])}
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            schema = _message_schema(f.message_type, limits)
        else:
            schema = (
                {**PROTO_KINDS[f.type], **limits.get(f.name, {})} if not f.is_repeated else dict(PROTO_KINDS[f.type])
            )
        properties[f.name] = {"type": "array", "items": schema, **limits.get(f.name, {})} if f.is_repeated else schema
    return {"type": "object", "additionalProperties": False, "properties": properties}


def _live_request(limits: dict) -> dict:
    schema = _message_schema(images_pb2.GenerateRequest.DESCRIPTOR, limits, skip=("n",))
    schema["required"] = ["prompt"]
    props = schema["properties"]
    props["size"] = {
        "type": "string",
        "pattern": SIZE_PATTERN,
        "description": "`WIDTHxHEIGHT` (instead of width and height)",
    }
    _lora_items(props["loras"])
    props["progress_every"]["default"] = 1
    props["preview_every"]["default"] = 2
    schema["dependentSchemas"] = {"size": {"not": {"anyOf": [{"required": ["width"]}, {"required": ["height"]}]}}}
    # a mode, a weight or divisions are for the regions the request gives
    schema["dependentRequired"] = {
        name: ["regions"] for name in ("region_mode", "base_prompt_weight", "region_divisions")
    }
    schema["description"] = (
        "The fields of ldm.v1.GenerateRequest (proto/ldm/v1/images.proto) in JSON, images as base64, "
        "enums as words; one image (no `n`)."
    )
    return schema


def _lora_items(loras: dict) -> None:
    """A `loras` array of the gRPC messages' JSON: each names its adapter."""
    lora = loras["items"]
    lora["required"] = ["name"]
    lora["properties"]["name"].update(minLength=1, description="an adapter's id (GET /v1/loras)")
    lora["properties"]["weight"]["default"] = 1


def _steer_request(limits: dict) -> dict:
    schema = _message_schema(images_pb2.Steer.DESCRIPTOR, limits)
    _lora_items(schema["properties"]["loras"])
    schema["minProperties"] = 1
    # every region names its negative prompt, or none does (the generation's is the pipeline's to know)
    schema["properties"]["regions"]["anyOf"] = [
        {"items": {"required": ["negative_prompt"]}},
        {"items": {"not": {"required": ["negative_prompt"]}}},
    ]
    return schema


def _live_paths() -> dict:
    generation_id = [
        {
            "name": "id",
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": "`<replica>.<token>`, from X-Generation-Id or `generation.created`",
        }
    ]
    from_header = {"id": "$response.header.X-Generation-Id"}
    return {
        "/v1/generations": {
            "post": {
                "summary": "Start a live (steerable) generation; its events as server-sent events",
                "operationId": "generations_create",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LiveGenerationRequest"}}},
                },
                "responses": {
                    "200": {
                        "description": "`text/event-stream`: `generation.created`, `generation.progress`, "
                        "`generation.steered`, then `generation.completed` or `error`. Closing the stream "
                        "cancels the generation.",
                        "headers": {"X-Generation-Id": {"schema": {"type": "string"}}, **REQUEST_ID},
                        "content": {"text/event-stream": {"schema": sse(LIVE_EVENTS)}},
                        "links": {
                            "steer": {"operationId": "generations_steer", "parameters": from_header},
                            "cancel": {"operationId": "generations_cancel", "parameters": from_header},
                        },
                    },
                    **_errors("400", "401", "403", "404", "413", "415", "429", "499", "500", "501", "503"),
                },
            }
        },
        "/v1/generations/{id}/steer": {
            "post": {
                "summary": "Change a running generation's conditioning from its next step",
                "operationId": "generations_steer",
                "parameters": generation_id,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SteerRequest"}}},
                },
                "responses": {
                    "202": {
                        "description": "accepted; its `generation.steered` event tells the step that used it",
                        "headers": REQUEST_ID,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["id", "steer_id"],
                                    "properties": {
                                        "id": {"type": "string"},
                                        "steer_id": {"type": "integer", "minimum": 1},
                                    },
                                }
                            }
                        },
                    },
                    **_errors("400", "401", "403", "404", "409", "413", "415", "500", "501", "503"),
                },
            }
        },
        "/v1/generations/{id}": {
            "delete": {
                "summary": "Cancel a running generation (its stream ends with an `error` event, code `cancelled`)",
                "operationId": "generations_cancel",
                "parameters": generation_id,
                "responses": {
                    "200": {
                        "description": "cancelled",
                        "headers": REQUEST_ID,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["id", "status"],
                                    "properties": {"id": {"type": "string"}, "status": {"const": "cancelled"}},
                                }
                            }
                        },
                    },
                    **_errors("401", "403", "404", "409", "500", "503"),
                },
            }
        },
        "/": _probe("the interactive page (serving/gateway/static/index.html)", "text/html"),
        "/static/{path}": {
            "get": {
                "summary": "the page's files (serving/gateway/static/)",
                "parameters": [{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the file", "content": {"*/*": {}}}, **_errors("403", "404")},
            }
        },
    }


def _probe(description: str, content_type: str = "application/json", *errors) -> dict:
    return {
        "get": {
            "summary": description,
            "responses": {"200": {"description": "ok", "content": {content_type: {}}}, **_errors("403", *errors)},
        }
    }


def _sampler_list() -> dict:
    strings = {"type": "array", "items": {"type": "string"}}
    sampler = {
        "type": "object",
        "properties": {
            "object": {"const": "sampler"},
            "name": {"type": "string", "description": "what `sampler` takes"},
            "description": {"type": "string"},
            "a1111_names": dict(strings, description="display names `sampler` also takes (any case)"),
            "sigma_schedules": dict(strings, description="what `sigma_schedule` may be with it"),
            "fits": {"type": "string", "description": "the models it fits"},
            "parameters": dict(strings, description="the request fields it reads"),
            "fits_served_model": {"type": "boolean", "description": "absent when the served export does not say"},
        },
    }
    return {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": sampler},
            "default_sampler": {"type": ["string", "null"], "description": "what a request naming no sampler gets"},
            "default_sigma_schedule": {"type": ["string", "null"]},
        },
    }


def _list_response(items: dict) -> dict:
    """A 200 answer in OpenAI's list shape: {"object": "list", "data": [items]}."""
    schema = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": items}},
    }
    return {
        "description": "OpenAI's list shape",
        "headers": REQUEST_ID,
        "content": {"application/json": {"schema": schema}},
    }


def _model() -> dict:
    strings = {"type": "array", "items": {"type": "string"}}
    return {
        "type": "object",
        "required": [
            "id",
            "object",
            "created",
            "owned_by",
            "family",
            "native_size",
            "max_size",
            "tasks",
            "default_sampler",
            "default",
        ],
        "properties": {
            "id": {"type": "string", "description": "what a request's `model` takes"},
            "object": {"const": "model"},
            "created": {"type": "integer", "description": "Unix seconds: when the gateway read the served pipeline"},
            "owned_by": {"type": "string"},
            "family": {
                "type": "string",
                "description": "sd, sdxl, ...: which fields and tasks it takes",
                "x-ldm-extension": True,
            },
            "native_size": {
                "type": "integer",
                "description": "pixels: the side of `size: auto`",
                "x-ldm-extension": True,
            },
            "max_size": {"type": "integer", "description": "pixels: the largest side served", "x-ldm-extension": True},
            "tasks": dict(strings, description="txt2img, img2img, inpaint, upscale", **{"x-ldm-extension": True}),
            "default_sampler": {
                "type": ["string", "null"],
                "description": "what a request naming no sampler gets",
                "x-ldm-extension": True,
            },
            "default_sigma_schedule": {"type": ["string", "null"], "x-ldm-extension": True},
            "default": {
                "type": "boolean",
                "description": "the model of requests that name none",
                "x-ldm-extension": True,
            },
        },
    }


def _served_ids(model) -> list:
    from serving.gateway.models import served_models

    return [m.id for m in served_models(model)]


def _model_paths(ids: list) -> dict:
    model = {"$ref": "#/components/schemas/Model"}
    known = {"examples": ids} if ids else {}
    return {
        "/v1/models": {
            "get": {
                "summary": "The models this server serves (a request's `model`), the default first: OpenAI's list of model "
                "objects, with each model's family, sizes, tasks and default sampler",
                "operationId": "models_list",
                "responses": {
                    "200": _list_response(model),
                    **_errors("401", "403", "503"),
                },
            }
        },
        "/v1/models/{id}": {
            "get": {
                "summary": "One served model",
                "operationId": "models_retrieve",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string", **known}}],
                "responses": {
                    "200": {
                        "description": "the model object",
                        "headers": REQUEST_ID,
                        "content": {"application/json": {"schema": model}},
                    },
                    **_errors("401", "403", "404", "503"),
                },
            }
        },
    }


LORA_MEANINGS = {
    "400": "a parameter is malformed (`param` names it), a file that is not a LoRA of the model (`param`: file; the "
    "message says why, naming the first layer that does not fit), or a model that takes no LoRA adapters",
    "403": "not an admin key (uploads and removals take one when the server has keys), or a browser request from "
    "another origin or to an unknown Host",
    "404": "no adapter of that name (`param`: name), or no served model of that name (`param`: model)",
    "409": "the adapter is used by a running generation: retry when it has finished",
    "413": "the file is over the pipeline's max_lora_file_mb",
    "501": "the served pipeline takes no LoRA messages (an export made before them)",
}


def _lora() -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "model", "resident"],
        "properties": {
            "id": {"type": "string", "description": "what a request's `loras[].name` and `<lora:id:weight>` take"},
            "object": {"const": "lora"},
            "model": {"type": "string", "description": "the served model it adapts"},
            "resident": {
                "type": "boolean",
                "description": "read into memory now (an evicted one is read again when named)",
            },
        },
    }


def _lora_paths(ids: list) -> dict:
    model_query = [
        {
            "name": "model",
            "in": "query",
            "required": False,
            "schema": {"type": "string", **({"examples": ids} if ids else {})},
            "description": "a served model (default: every model's adapters; for DELETE the default model)",
        }
    ]
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    lora = {"$ref": "#/components/schemas/Lora"}
    return {
        "/v1/loras": {
            "get": {
                "summary": "The LoRA adapters the server holds (OpenAI's list shape)",
                "operationId": "loras_list",
                "parameters": model_query,
                "responses": {
                    "200": _list_response(lora),
                    **_errors("400", "401", "403", "404", "500", "503", meanings=LORA_MEANINGS),
                },
            },
            "post": {
                "summary": "Upload a LoRA adapter (safetensors, diffusers/PEFT or kohya-ss/A1111 keys); replaces "
                "one of the same name. With API keys on: an admin key",
                "operationId": "loras_upload",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file"],
                                "additionalProperties": False,
                                "properties": {
                                    "file": {
                                        "type": "string",
                                        "format": "binary",
                                        "description": "the .safetensors file",
                                    },
                                    "name": {
                                        "type": "string",
                                        "pattern": "^[A-Za-z0-9_.-]{1,64}$",
                                        "description": "default: the file's stem",
                                    },
                                    "model": {"type": "string", "description": "default: the server's default model"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "the adapter",
                        "headers": REQUEST_ID,
                        "content": {"application/json": {"schema": lora}},
                    },
                    **_errors("400", "401", "403", "404", "409", "413", "500", "501", "503", meanings=LORA_MEANINGS),
                },
            },
        },
        "/v1/loras/{name}": {
            "get": {
                "summary": "One adapter",
                "operationId": "loras_retrieve",
                "parameters": name + model_query,
                "responses": {
                    "200": {
                        "description": "the adapter",
                        "headers": REQUEST_ID,
                        "content": {"application/json": {"schema": lora}},
                    },
                    **_errors("400", "401", "403", "404", "500", "503", meanings=LORA_MEANINGS),
                },
            },
            "delete": {
                "summary": "Remove an adapter (refused while a running generation uses it). With API keys on: an "
                "admin key",
                "operationId": "loras_delete",
                "parameters": name + model_query,
                "responses": {
                    "200": {
                        "description": "removed",
                        "headers": REQUEST_ID,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["id", "object", "deleted"],
                                    "properties": {
                                        "id": {"type": "string"},
                                        "object": {"const": "lora"},
                                        "model": {"type": "string"},
                                        "deleted": {"const": True},
                                    },
                                }
                            }
                        },
                    },
                    **_errors("400", "401", "403", "404", "409", "500", "501", "503", meanings=LORA_MEANINGS),
                },
            },
        },
    }


def _readiness() -> dict:
    ready = {
        "application/json": {
            "schema": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
        }
    }
    return {
        "get": {
            "summary": "readiness: the pipeline behind the gateway is ready",
            "responses": {
                "200": {"description": "ready", "content": ready},
                "503": {"description": "not ready", "content": ready},
                **_errors("403"),
            },
        }
    }


def document(model=None) -> dict:
    """The document; `model` (serving/gateway/pipeline.py PipelineModel) adds the served
    pipeline's limits."""
    limits = _limits(model)
    ids = _served_ids(model)  # examples of `model` and model ids (the served ones)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ldm-serving gateway",
            "version": "1",
            "description": "OpenAI-compatible Images API in front of a step-batching latent diffusion pipeline. "
            "The typed gRPC API (ldm.v1.Images) is served on the gateway's gRPC port.",
        },
        "paths": {
            "/v1/images/generations": {
                "post": _operation(GENERATIONS, "Create images from a prompt", "application/json", "image_generation")
            },
            "/v1/images/edits": {
                "post": _operation(
                    EDITS, "Edit an image (inpaint where transparent / masked)", "multipart/form-data", "image_edit"
                )
            },
            "/v1/samplers": {
                "get": {
                    "summary": "The samplers a request may name (`sampler`), with their A1111 names, sigma schedules, "
                    "parameters, the models they fit and whether they fit the served one",
                    "operationId": "samplers_list",
                    "parameters": [
                        {
                            "name": "model",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", **({"examples": ids} if ids else {})},
                            "description": "whether each fits this served model, and its default (default: the "
                            "server's default model)",
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "OpenAI's list shape",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SamplerList"}}},
                        },
                        **_errors("401", "403", "404"),
                    },
                }
            },
            **_model_paths(ids),
            **_lora_paths(ids),
            **_live_paths(),
            "/healthz": _probe("liveness: the gateway answers"),
            "/readyz": _readiness(),
            "/metrics": _probe("Prometheus metrics of the gateway", "text/plain"),
            "/openapi.json": _probe("this document"),
            "/docs": _probe("this document as a page", "text/html"),
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "only when the server is configured with API keys",
                }
            },
            "schemas": {
                "GenerationsRequest": _body(GENERATIONS, limits),
                "EditsRequest": _body(EDITS, limits),
                "LiveGenerationRequest": _live_request(limits),
                "SteerRequest": _steer_request(limits),
                "ImagesResponse": {
                    "type": "object",
                    "required": ["created", "data"],
                    "properties": {
                        "created": {"type": "integer"},
                        "data": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["b64_json"],
                                "properties": {
                                    "b64_json": {"type": "string", "description": "the image, base64"},
                                    "seed": {"type": "integer", "x-ldm-extension": True},
                                },
                            },
                        },
                        "output_format": {"type": "string", "enum": list(FORMATS)},
                        "size": {"type": "string"},
                        "background": {"type": "string"},
                    },
                },
                "SamplerList": _sampler_list(),
                "Model": _model(),
                "Lora": _lora(),
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type", "param", "code"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": "string"},
                            },
                        }
                    },
                },
            },
        },
        "security": [{}, {"bearer": []}],
    }
