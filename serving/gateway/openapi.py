"""The OpenAPI 3.1 document of the REST front, built from the parameter table
(serving/gateway/rest_params.py) and, for the live generations, from the GenerateRequest
message their body spells (serving/gateway/rest_live.py), so the document and the parsers
cannot disagree."""
from google.protobuf.descriptor import FieldDescriptor

from serving.gateway.generation import FORMATS
from serving.gateway.protos import images_pb2
from serving.gateway.rest_params import EDITS, GENERATIONS, params_of

KINDS = {"string": {"type": "string"}, "integer": {"type": "integer"}, "number": {"type": "number"},
         "boolean": {"type": "boolean"}, "file": {"type": "string", "format": "binary"}, "any": {},
         "interval": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "minItems": 2, "maxItems": 2}}


def _schema(param) -> dict:
    schema = dict(KINDS[param.kind], description=param.description)
    bounds = () if param.kind == "interval" else (("minimum", param.minimum), ("maximum", param.maximum))
    for key, value in (("enum", list(param.enum) or None), *bounds, ("default", param.default)):
        if value is not None:
            schema[key] = value
    if param.extension:
        schema["x-ldm-extension"] = True
    return schema


def _body(route: str) -> dict:
    params = params_of(route)
    return {"type": "object", "additionalProperties": False, "required": [p.name for p in params if p.required],
            "properties": {p.name: _schema(p) for p in params}}


def _errors() -> dict:
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    retry = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    return {
        "400": {"description": "a parameter is missing, malformed or out of range (`param` names it)", **ref},
        "401": {"description": "API key missing or unknown (when the server has keys)", **ref},
        "413": {"description": "body or image over the server's limits", **ref},
        "429": {"description": "rate limit reached", "headers": retry, **ref},
        "501": {"description": "the served pipeline does not take an input the request uses", **ref},
        "503": {"description": "queue full, shutting down, or timeout_s passed; try again", "headers": retry, **ref},
    }


def _operation(route: str, summary: str, content_type: str, event: str) -> dict:
    return {
        "summary": summary,
        "operationId": f"images_{route}",
        "requestBody": {"required": True, "content": {content_type: {"schema": {"$ref": f"#/components/schemas/{route.title()}Request"}}}},
        "responses": {
            "200": {"description": f"the images; with stream: server-sent events `{event}.partial_image`, "
                                   f"`{event}.completed` (one per image), or `error`",
                    "headers": {"X-Request-Id": {"schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImagesResponse"}},
                                "text/event-stream": {"schema": {"$ref": "#/components/schemas/ImageEvent"}}}},
            **_errors(),
        },
    }


PROTO_KINDS = {FieldDescriptor.TYPE_STRING: {"type": "string"}, FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
               FieldDescriptor.TYPE_FLOAT: {"type": "number"}, FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
               FieldDescriptor.TYPE_INT32: {"type": "integer"}, FieldDescriptor.TYPE_UINT64: {"type": "integer", "minimum": 0},
               FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"}}


def _message_schema(message, skip=()) -> dict:
    from serving.gateway.rest_live import ENUMS

    properties = {}
    for f in message.fields:
        if f.name in skip:
            continue
        if f.name in ENUMS:
            schema = {"type": "string", "enum": list(ENUMS[f.name])}
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            schema = _message_schema(f.message_type)
        else:
            schema = dict(PROTO_KINDS[f.type])
        properties[f.name] = {"type": "array", "items": schema} if f.is_repeated else schema
    return {"type": "object", "additionalProperties": False, "properties": properties}


def _live_request() -> dict:
    schema = _message_schema(images_pb2.GenerateRequest.DESCRIPTOR, skip=("n",))
    schema["required"] = ["prompt"]
    props = schema["properties"]
    props["size"] = {"type": "string", "description": "`WIDTHxHEIGHT` (instead of width and height)"}
    props["progress_every"]["default"] = 1
    props["preview_every"]["default"] = 2
    schema["description"] = ("The fields of ldm.v1.GenerateRequest (proto/ldm/v1/images.proto) in JSON, images as base64, "
                             "enums as words; one image (no `n`).")
    return schema


def _live_errors(*codes) -> dict:
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    text = {"400": "a field is malformed or out of range (`param` names it)", "401": "API key missing or unknown",
            "404": "no such generation (unknown, forgotten, or another key's)", "409": "the generation has finished",
            "503": "the replica running it cannot be reached, or the queue is full; try again"}
    return {code: {"description": text[code], **ref} for code in codes}


def _live_paths() -> dict:
    generation_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
                      "description": "`<replica>.<token>`, from X-Generation-Id or `generation.created`"}]
    return {
        "/v1/generations": {"post": {
            "summary": "Start a live (steerable) generation; its events as server-sent events",
            "operationId": "generations_create",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/LiveGenerationRequest"}}}},
            "responses": {
                "200": {"description": "`text/event-stream`: `generation.created` {id, seed, total_steps}, "
                                       "`generation.progress` {id, step, total_steps, preview_b64?}, `generation.steered` "
                                       "{id, steer_id, step (0-based index of the first step that used it)}, then "
                                       "`generation.completed` {id, b64_json, seed, output_format, timings} or `error` "
                                       "{error}. Closing the stream cancels the generation.",
                        "headers": {"X-Generation-Id": {"schema": {"type": "string"}},
                                    "X-Request-Id": {"schema": {"type": "string"}}},
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                **_live_errors("400", "401", "503")}}},
        "/v1/generations/{id}/steer": {"post": {
            "summary": "Change a running generation's prompt, negative prompt or guidance scale from its next step",
            "operationId": "generations_steer", "parameters": generation_id,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/SteerRequest"}}}},
            "responses": {"202": {"description": "accepted; its `generation.steered` event tells the step that used it",
                                  "content": {"application/json": {"schema": {"type": "object", "properties": {
                                      "id": {"type": "string"}, "steer_id": {"type": "integer"}}}}}},
                          **_live_errors("400", "401", "404", "409", "503")}}},
        "/v1/generations/{id}": {"delete": {
            "summary": "Cancel a running generation (its stream ends with an `error` event, code `cancelled`)",
            "operationId": "generations_cancel", "parameters": generation_id,
            "responses": {"200": {"description": "cancelled", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"id": {"type": "string"}, "status": {"const": "cancelled"}}}}}},
                **_live_errors("401", "404", "409", "503")}}},
        "/": _probe("the interactive page (serving/gateway/static/index.html)", "text/html"),
        "/static/{path}": _probe("the page's files (serving/gateway/static/)", "*/*"),
    }


def _probe(description: str, content_type: str = "application/json") -> dict:
    return {"get": {"summary": description, "responses": {"200": {"description": "ok", "content": {content_type: {}}}}}}


def _sampler_list() -> dict:
    strings = {"type": "array", "items": {"type": "string"}}
    sampler = {"type": "object", "properties": {
        "object": {"const": "sampler"}, "name": {"type": "string", "description": "what `sampler` takes"},
        "description": {"type": "string"},
        "a1111_names": dict(strings, description="display names `sampler` also takes (any case)"),
        "sigma_schedules": dict(strings, description="what `sigma_schedule` may be with it"),
        "fits": {"type": "string", "description": "the models it fits"},
        "parameters": dict(strings, description="the request fields it reads"),
        "fits_served_model": {"type": "boolean", "description": "absent when the served export does not say"}}}
    return {"type": "object", "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": sampler},
        "default_sampler": {"type": ["string", "null"], "description": "what a request naming no sampler gets"},
        "default_sigma_schedule": {"type": ["string", "null"]}}}


def document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "ldm-serving gateway", "version": "1",
                 "description": "OpenAI-compatible Images API in front of a step-batching latent diffusion pipeline. "
                                "The typed gRPC API (ldm.v1.Images) is served on the gateway's gRPC port."},
        "paths": {
            "/v1/images/generations": {"post": _operation(GENERATIONS, "Create images from a prompt", "application/json",
                                                          "image_generation")},
            "/v1/images/edits": {"post": _operation(EDITS, "Edit an image (inpaint where transparent / masked)",
                                                    "multipart/form-data", "image_edit")},
            "/v1/samplers": {"get": {
                "summary": "The samplers a request may name (`sampler`), with their A1111 names, sigma schedules, "
                           "parameters, the models they fit and whether they fit the served one",
                "operationId": "samplers_list",
                "responses": {"200": {"description": "OpenAI's list shape", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/SamplerList"}}}},
                              **_live_errors("401")}}},
            **_live_paths(),
            "/healthz": _probe("liveness: the gateway answers"),
            "/readyz": _probe("readiness: the pipeline behind the gateway is ready (503 when not)"),
            "/metrics": _probe("Prometheus metrics of the gateway", "text/plain"),
            "/openapi.json": _probe("this document"),
            "/docs": _probe("this document as a page", "text/html"),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the server is configured with API keys"}},
            "schemas": {
                "GenerationsRequest": _body(GENERATIONS),
                "EditsRequest": _body(EDITS),
                "LiveGenerationRequest": _live_request(),
                "SteerRequest": _message_schema(images_pb2.Steer.DESCRIPTOR),
                "ImagesResponse": {"type": "object", "properties": {
                    "created": {"type": "integer"},
                    "data": {"type": "array", "items": {"type": "object", "properties": {
                        "b64_json": {"type": "string", "description": "the image, base64"},
                        "seed": {"type": "integer", "x-ldm-extension": True}}}},
                    "output_format": {"type": "string", "enum": list(FORMATS)},
                    "size": {"type": "string"}, "background": {"type": "string"}}},
                "ImageEvent": {"type": "object", "properties": {
                    "type": {"type": "string"}, "b64_json": {"type": "string"}, "partial_image_index": {"type": "integer"},
                    "image_index": {"type": "integer", "x-ldm-extension": True}, "seed": {"type": "integer"},
                    "created_at": {"type": "integer"}, "size": {"type": "string"}, "output_format": {"type": "string"}}},
                "SamplerList": _sampler_list(),
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}}},
            },
        },
        "security": [{}, {"bearer": []}],
    }
