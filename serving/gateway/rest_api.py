"""The REST front (aiohttp): OpenAI's Images API at /v1/images/generations and /v1/images/edits,
its error shape, server-sent events for `stream: true`; the models they take (/v1/models,
/v1/models/{id}: OpenAI's Models API) and the samplers (/v1/samplers, in OpenAI's list shape);
the LoRA adapters (/v1/loras: serving/gateway/loras.py); the OpenAPI document (/openapi.json), a
page rendering it (/docs),
liveness (/healthz), readiness (/readyz) and metrics (/metrics).

A client that disconnects cancels its request (the handler is cancelled, which closes the
pipeline stream). Every response carries `X-Request-Id`.
"""

import base64
import json
import math
from pathlib import Path
import time

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.core.errors import CANCELLED, INVALID_ARG
from serving.gateway import images, loras, models, rest_params
from serving.gateway.access import bearer
from serving.gateway.errors import (
    HTTP_STATUS,
    NOT_FOUND,
    TOO_LARGE,
    UNIMPLEMENTED,
    UNSUPPORTED_MEDIA_TYPE,
    ApiError,
    invalid,
)
from serving.gateway.generation import Generation, lora_inputs
from serving.gateway.openapi import document
from serving.gateway.rest_params import EDITS, GENERATIONS, parse_size
from serving.gateway.samplers import rest_list, served_samplers
from serving.gateway.service import EncodedImage, ImageService, ProgressEvent
from serving.gateway.telemetry import request_id, unexpected

SERVICE = web.AppKey("service", ImageService)
DOCS_PAGE = Path(__file__).resolve().parent / "static" / "docs.html"
# Generation's field names -> the REST parameters they come from
REST_NAMES = {
    "height": "size",
    "width": "size",
    "init_image": "image",
    "quality": "output_compression",
    "preview_every": "partial_images",
    "lora_names": "loras",
    "lora_weights": "loras",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
}
ERROR_CODES = {"UNAUTHENTICATED": "invalid_api_key", "RESOURCE_EXHAUSTED": "rate_limit_exceeded"}
LISTS = ("interval", "pair", "loras")  # parameter kinds a form gives as `a,b` or as the field twice


def error_body(error: ApiError) -> dict:
    status = HTTP_STATUS.get(error.code, 500)
    # OpenAI's code for a model it does not have
    code = (
        "model_not_found"
        if error.code == NOT_FOUND and error.field == "model"
        else ERROR_CODES.get(error.code, error.code.lower())
    )
    return {
        "error": {
            "message": str(error),
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": error.field,
            "code": code,
        }
    }


def error_response(error: ApiError) -> web.Response:
    status = HTTP_STATUS.get(error.code, 500)
    response = web.json_response(error_body(error), status=status)
    if status in (429, 503):
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s or 1)))
    return response


@web.middleware
async def gateway_middleware(request, handler):
    rid = request_id(request.headers.get("X-Request-Id"))
    request["rid"] = rid
    try:
        response = await handler(request)
    except ApiError as error:
        response = error_response(error.renamed(REST_NAMES))
    except web.HTTPRequestEntityTooLarge:
        response = error_response(_too_large(request))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(ApiError(NOT_FOUND if exc.status == 404 else INVALID_ARG, exc.reason))
        response.set_status(exc.status)
        if "Allow" in exc.headers:  # a 405 says which methods the path takes (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
    except Exception as exc:  # a handler's uncoded error is still the documented JSON, with the request id
        response = error_response(unexpected(exc, rid))
    if not response.prepared:
        response.headers["X-Request-Id"] = rid
        response.headers.setdefault("X-Ldm-Replica", request.app[SERVICE].replica)
    return response


def to_generation(params: dict, route: str, service: ImageService) -> Generation:
    stream, partial = params.get("stream", False), params.get("partial_images", 0)
    if partial and not stream:
        raise invalid("partial_images", "needs stream: true")
    inputs = {p.name: params[p.name] for p in rest_params.params_of(route) if p.to_pipeline and p.name in params}
    inputs.update(lora_inputs(params.get("loras")))
    size = parse_size(params.get("size", "auto"))
    if size:
        inputs["height"], inputs["width"] = size
    preview_every = 0
    if partial:
        steps = inputs.get("steps") or service.default_steps()
        preview_every = max(1, steps // (partial + 1))
    return Generation(
        prompt=params["prompt"],
        inputs=inputs,
        n=params.get("n", 1),
        seed=params.get("seed"),
        output_format=params.get("output_format", "png"),
        quality=max(1, params.get("output_compression", 90)),
        preview_every=preview_every,
    )


def add_edit_images(generation: Generation, params: dict, service: ImageService) -> None:
    """init_image (and mask) from the uploads, not yet read: `admit` checks their headers."""
    if "init_image" not in service.pipeline.require_model().inputs:
        raise ApiError(
            UNIMPLEMENTED,
            "image edits need a pipeline with image conditioning (an init_image input); the served pipeline has none",
            "image",
        )
    generation.inputs["init_image"] = images.Upload(_upload(params["image"], "image"), "init_image")
    if "mask" in params:
        generation.inputs["mask"] = images.Upload(_upload(params["mask"], "mask"), "mask", mask=True)


def edit_arrays(inputs: dict) -> dict:
    """The edit's init_image and mask decoded (on the service's pool): OpenAI's rule, without a
    mask the image's transparent pixels are repainted; the mask fits the image, both the size."""
    picture = inputs["init_image"].load()
    rgb = np.asarray(picture.convert("RGB"))
    if "mask" in inputs:
        mask = images.resized(inputs["mask"].decode(), *rgb.shape[:2])
    elif images.has_alpha(picture):
        mask = images.alpha_repaint_mask(picture)
    else:
        mask = None
    if "height" in inputs:
        size = inputs["height"], inputs["width"]
        rgb = images.resized(rgb, *size)
        mask = None if mask is None else images.resized(mask, *size)
    return {"init_image": rgb} if mask is None else {"init_image": rgb, "mask": mask}


def _upload(value, name: str) -> bytes:
    if not hasattr(value, "file"):
        raise invalid(name, "must be a file upload (multipart/form-data)")
    return value.file.read()


def _too_large(request) -> ApiError:
    return ApiError(
        TOO_LARGE, f"request body over this server's {request.app[SERVICE].limits.max_body_bytes} bytes", "body"
    )


async def _form(request) -> dict:
    if not request.content_type.startswith("multipart/form-data"):
        raise invalid("body", "must be multipart/form-data")
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    except (ValueError, BadHttpMessage) as exc:  # a multipart body without its boundary, with a bad part header, ...
        raise invalid("body", f"is not well-formed multipart/form-data: {exc}") from None
    values = {}
    for key, value in form.items():
        name = key.removesuffix("[]")
        if rest_params.BY_NAME.get(name) and rest_params.BY_NAME[name].kind in LISTS:
            # [lo, hi] as `lo,hi`, or as the field twice (how SDKs send a list in a form)
            values.setdefault(name, []).append(value)
            continue
        if name in values:
            raise invalid(name, "give it once (this server edits one image per request)")
        values[name] = value
    for name, parts in values.items():
        if rest_params.BY_NAME.get(name) and rest_params.BY_NAME[name].kind in LISTS and len(parts) == 1:
            values[name] = parts[0]
    return values


async def read_json(request) -> dict:
    """The request's JSON object; 400 naming `body` for anything else. It must be declared JSON:
    a cross-origin page can send text/plain without asking (serving/gateway/browser.py)."""
    if request.content_type != "application/json":
        raise ApiError(UNSUPPORTED_MEDIA_TYPE, f"must be application/json, got {request.content_type}", "Content-Type")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid("body", "must be a JSON object") from None
    except RecursionError:  # the decoder's recursion guard: nesting no request needs
        raise invalid("body", "is nested too deeply") from None
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object")
    return body


async def generations(request):
    service = request.app[SERVICE]
    with service.metrics.request("rest.generations", request["rid"]) as outcome:
        request["caller"] = service.identify(bearer(request.headers.get("Authorization")), request.remote or "-")
        params = rest_params.parse(await read_json(request), GENERATIONS, from_form=False)
        generation = to_generation(params, GENERATIONS, service)
        return await _answer(request, "rest.generations", "image_generation", params, generation, outcome)


async def edits(request):
    service = request.app[SERVICE]
    with service.metrics.request("rest.edits", request["rid"]) as outcome:
        request["caller"] = service.identify(bearer(request.headers.get("Authorization")), request.remote or "-")
        params = rest_params.parse(await _form(request), EDITS, from_form=True)
        generation = to_generation(params, EDITS, service)
        add_edit_images(generation, params, service)
        return await _answer(request, "rest.edits", "image_edit", params, generation, outcome)


def _size(image: EncodedImage) -> str:
    return f"{image.width}x{image.height}"


async def _answer(request, route: str, event_type: str, params: dict, generation: Generation, outcome):
    service, rid = request.app[SERVICE], request["rid"]
    await service.admit(generation, request["caller"])
    await service.decode(generation, edit_arrays)
    events = service.events(generation, rid, route)
    if not params.get("stream"):
        done = {}
        async for event in events:
            if isinstance(event, EncodedImage):
                done[event.index] = event
        outcome.images = len(done)
        ordered = [done[i] for i in sorted(done)]
        return web.json_response(
            {
                "created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(i.data).decode(), "seed": i.seed} for i in ordered],
                "background": "opaque",
                "output_format": generation.output_format,
                "size": _size(ordered[0]),
            }
        )
    first = await anext(events)  # an early error is still an HTTP status, not an event
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": rid}
    )
    await response.prepare(request)
    try:
        await _stream(response, event_type, params.get("partial_images", 0), generation, _chain(first, events), outcome)
    except ConnectionResetError:
        outcome.code = CANCELLED
        raise
    except Exception as exc:  # after the headers: an error event, as OpenAI's streams send
        error = exc if isinstance(exc, ApiError) else unexpected(exc, rid)
        outcome.code = error.code
        await _send(response, "error", error_body(error.renamed(REST_NAMES)))
    await response.write_eof()
    return response


async def _stream(response, event_type: str, partial_limit: int, generation: Generation, events, outcome) -> None:
    partials = {}
    async for event in events:
        common = {"created_at": int(time.time()), "background": "opaque", "quality": "auto", "image_index": event.index}
        if isinstance(event, ProgressEvent):
            sent = partials.get(event.index, 0)
            if event.preview is None or sent >= partial_limit:
                continue
            partials[event.index] = sent + 1
            await _send(
                response,
                f"{event_type}.partial_image",
                {
                    "type": f"{event_type}.partial_image",
                    "b64_json": base64.b64encode(event.preview).decode(),
                    "partial_image_index": sent,
                    "output_format": "png",
                    **common,
                },
            )
        else:
            outcome.images += 1
            await _send(
                response,
                f"{event_type}.completed",
                {
                    "type": f"{event_type}.completed",
                    "b64_json": base64.b64encode(event.data).decode(),
                    "seed": event.seed,
                    "size": _size(event),
                    "output_format": generation.output_format,
                    **common,
                },
            )


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


async def _send(response, event: str, data: dict) -> None:
    await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


async def samplers(request):
    service = request.app[SERVICE]
    with service.metrics.request("rest.samplers", request["rid"]):
        service.identify(bearer(request.headers.get("Authorization")), request.remote or "-")
        name = _query(request, "model")
        return web.json_response(rest_list(served_samplers(service.pipeline.model, name)))


def _query(request, name: str) -> str:
    """A query parameter given at most once ("" when absent); others are ignored."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise invalid(name, "give it once")
    return values[0] if values else ""


async def list_models(request):
    """GET /v1/models: OpenAI's list of model objects, with each model's family, sizes, tasks and
    default sampler (serving/gateway/models.py)."""
    service = request.app[SERVICE]
    with service.metrics.request("rest.models", request["rid"]):
        service.identify(bearer(request.headers.get("Authorization")), request.remote or "-")
        model = service.pipeline.require_model()
        return web.json_response(models.rest_list(models.served_models(model), model.read_at))


async def get_model(request):
    """GET /v1/models/{id}: one model object; 404 naming the id when this server does not serve it."""
    service = request.app[SERVICE]
    with service.metrics.request("rest.models", request["rid"]):
        service.identify(bearer(request.headers.get("Authorization")), request.remote or "-")
        model = service.pipeline.require_model()
        served = models.lookup(models.served_models(model), request.match_info["id"])
        return web.json_response(models.rest_entry(served, model.read_at))


async def openapi_json(request):
    return web.json_response(document(request.app[SERVICE].pipeline.model))


async def docs(request):
    return web.FileResponse(DOCS_PAGE, headers={"Content-Type": "text/html; charset=utf-8"})


async def healthz(request):
    return web.json_response({"status": "alive"})


async def readyz(request):
    ready = request.app[SERVICE].ready
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def metrics(request):
    body = generate_latest(request.app[SERVICE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(service: ImageService) -> web.Application:
    """The REST application; more routes (live generations, the page: rest_live.add_routes) are
    added with app.router."""
    app = web.Application(client_max_size=service.limits.max_body_bytes, middlewares=[gateway_middleware])
    app[SERVICE] = service
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_post("/v1/images/edits", edits)
    app.router.add_get("/v1/samplers", samplers)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{id}", get_model)
    loras.add_routes(app, SERVICE)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
