"""The OpenAPI 3.1 document of the REST front, built from the parameter table
(serving/gateway/rest_params.py), so the document and the parser cannot disagree."""
from serving.gateway.generation import FORMATS
from serving.gateway.rest_params import EDITS, GENERATIONS, params_of

KINDS = {"string": {"type": "string"}, "integer": {"type": "integer"}, "number": {"type": "number"},
         "boolean": {"type": "boolean"}, "file": {"type": "string", "format": "binary"}, "any": {}}


def _schema(param) -> dict:
    schema = dict(KINDS[param.kind], description=param.description)
    for key, value in (("enum", list(param.enum) or None), ("minimum", param.minimum), ("maximum", param.maximum),
                       ("default", param.default)):
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


def _probe(description: str, content_type: str = "application/json") -> dict:
    return {"get": {"summary": description, "responses": {"200": {"description": "ok", "content": {content_type: {}}}}}}


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
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}}},
            },
        },
        "security": [{}, {"bearer": []}],
    }
