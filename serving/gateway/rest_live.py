"""REST live generations: `POST /v1/generations` (server-sent events), `POST
/v1/generations/{id}/steer`, `DELETE /v1/generations/{id}`; and the interactive page (`/`,
`/static/*`, serving/gateway/static/).

The body of `POST /v1/generations` is the gRPC GenerateRequest in JSON (proto3's JSON mapping:
images as base64 strings) with REST spellings: `size` "WxH" for width/height, and the enums
as words (`output_format` "png", `task` "img2img", `region_mode` "latent"), so both fronts
read a request the same way (grpc_api.to_generation). `n` is not taken: a live generation
makes one image. Headers (and so `X-Generation-Id`) are sent once the pipeline has answered the
generation's first event, so that a request the pipeline refuses is an HTTP error (400 naming
the field), as for /v1/images; after that an error is an `error` event ending the stream.

A steer or DELETE for another replica's generation is forwarded to it (serving/gateway/replicas.py).
Their answers say which gateway took the call (`X-Ldm-Replica`) and which ran it (`X-Ldm-Owner`).
"""

from typing import Any
import base64
import json
from pathlib import Path
import re

import aiohttp
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from serving.core.errors import UNAVAILABLE
from serving.gateway import grpc_api
from serving.gateway.access import bearer
from serving.gateway.errors import NOT_FOUND, ApiError, invalid
from serving.gateway.live import is_id
from serving.gateway.protos import images_pb2
from serving.gateway.replicas import FORWARDED_HEADER, Replicas, owner_gone
from serving.gateway.rest_api import SERVICE, error_body, error_response, read_json
from serving.gateway.rest_params import parse_size
from serving.gateway.service import EncodedImage, ImageService, ProgressEvent, SteerApplied
from serving.gateway.telemetry import unexpected

STATIC = Path(__file__).resolve().parent / "static"
REPLICAS = web.AppKey("replicas", Replicas)
PEER_SESSION = web.AppKey("peer_session", aiohttp.ClientSession)
ROUTE = "rest.live"
ENUMS = {
    "output_format": {name: value for value, name in grpc_api.FORMATS.items() if value},
    "task": {name: value for value, name in grpc_api.TASKS.items()},
    "region_mode": {name: value for value, name in grpc_api.REGION_MODES.items()},
}
# the JSON values each proto field type takes, and their name (an integer field: an integral number too)
NUMBER = ((int, float), "a number")
JSON_TYPES: dict[int, tuple[Any, str]] = {
    FieldDescriptor.TYPE_STRING: (str, "a string"),
    FieldDescriptor.TYPE_BYTES: (str, "a base64 string"),
    FieldDescriptor.TYPE_BOOL: (bool, "true or false"),
    FieldDescriptor.TYPE_FLOAT: NUMBER,
    FieldDescriptor.TYPE_DOUBLE: NUMBER,
    FieldDescriptor.TYPE_INT32: NUMBER,
    FieldDescriptor.TYPE_UINT64: NUMBER,
}
NOT_TAKEN = {"n": "a live generation makes one image; leave n out"}
# Generation's field names -> what a REST client sent
REST_NAMES = {**grpc_api.FIELD_NAMES}
# where json_format's ParseError says the bad field is: `... at GenerateRequest.regions[0].mask`,
# `... has no field named "colour" ...`, `Failed to parse regions field: Failed to parse mask field`
_AT_PATH = re.compile(r'at (?:GenerateRequest|Steer)\.([\w.\[\]]+)|no field named "(\w+)"')
_NESTED = re.compile(r"Failed to parse (\w+) field")


def check_json_types(value: dict, message, path: str = "") -> None:
    """400 naming the first field whose JSON type is not its declared one: json_format would
    read null as absent, `false` or "5" as a number; the document declares none of that."""
    for name, item in value.items():
        field = message.fields_by_name.get(name)
        if field is None or name in ENUMS:  # unknown: json_format names it; enums: their words are checked
            continue
        where = f"{path}{name}"
        if item is None:
            raise invalid(where, "must not be null; leave it out")
        if field.is_repeated and not isinstance(item, list):
            raise invalid(where, "must be an array")
        for element in item if field.is_repeated else [item]:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if not isinstance(element, dict):
                    raise invalid(where, "must be an object")
                check_json_types(element, field.message_type, f"{where}.")
                continue
            types, name_of_type = JSON_TYPES[field.type]
            if not isinstance(element, types) or (
                isinstance(element, bool) and field.type != FieldDescriptor.TYPE_BOOL
            ):
                raise invalid(where, f"must be {name_of_type}")


def to_request(body: dict):
    """The GenerateRequest a /v1/generations body spells; 400 naming the first bad field."""
    check_json_types(body, images_pb2.GenerateRequest.DESCRIPTOR)
    body = dict(body)
    for name, why in NOT_TAKEN.items():
        if name in body:
            raise invalid(name, why)
    if "prompt" not in body:
        raise invalid("prompt", "is required")
    if "size" in body:
        if "width" in body or "height" in body:
            raise invalid("size", "give size or width and height, not both")
        if not isinstance(body["size"], str):
            raise invalid("size", "must be a string WIDTHxHEIGHT")
        size = parse_size(body.pop("size"))
        if size:
            body["height"], body["width"] = size
    for name, words in ENUMS.items():
        if name in body:
            if not isinstance(body[name], str) or body[name] not in words:
                raise invalid(name, f"must be one of {', '.join(words)}, got {body[name]!r}")
            body[name] = words[body[name]]
    body.setdefault("progress_every", 1)
    body.setdefault("preview_every", 2)
    try:
        return json_format.ParseDict(body, images_pb2.GenerateRequest())
    except json_format.ParseError as exc:
        raise invalid(_parse_error_field(str(exc)), str(exc).splitlines()[0]) from None


def _parse_error_field(text: str) -> str:
    found = _AT_PATH.search(text)
    if found:
        return re.sub(r"\[\d+\]", "", next(filter(None, found.groups()))).rstrip(".")  # a message may end `...prompt.`
    return ".".join(_NESTED.findall(text)) or "body"


async def _send(response, event: str, data: dict) -> None:
    await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


async def create(request):
    service: ImageService = request.app[SERVICE]
    with service.metrics.request(ROUTE, request["rid"]) as outcome:
        caller = service.identify(bearer(request.headers.get("Authorization")), request.remote or "-")
        body = await read_json(request)
        renames = {**REST_NAMES, **({"height": "size", "width": "size"} if "size" in body else {})}
        try:
            generation = grpc_api.to_generation(to_request(body), streaming=True)
            live = await service.start_live(generation, caller)
            events = service.live_events(generation, live, ROUTE)
            first = await anext(events)  # a refused request is still an HTTP status
        except ApiError as error:  # answered here: the middleware's names are /v1/images'
            return error_response(outcome.failed(error).renamed(renames))
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Request-Id": request["rid"],
                "X-Generation-Id": live.id,
                "X-Ldm-Replica": service.replica,
            }
        )
        await response.prepare(request)
        total = (
            first.total_steps
            if isinstance(first, ProgressEvent)
            else generation.inputs.get("steps", service.default_steps())
        )
        await _send(response, "generation.created", {"id": live.id, "seed": generation.seed, "total_steps": total})
        try:
            await _send(response, *_sse(live.id, first, generation))
            async for event in events:
                await _send(response, *_sse(live.id, event, generation))
                outcome.images += isinstance(event, EncodedImage)
            outcome.images += isinstance(first, EncodedImage)
        except ConnectionResetError:
            raise
        except Exception as exc:  # after the headers: an error event ends the stream
            failure = exc if isinstance(exc, ApiError) else unexpected(exc, request["rid"])
            outcome.code = failure.code
            await _send(response, "error", error_body(failure.renamed(renames)))
        finally:  # a client gone while an event was being written: cancel the generation now
            await events.aclose()
        await response.write_eof()
        return response


def _sse(generation_id: str, event, generation) -> tuple:
    if isinstance(event, SteerApplied):
        return "generation.steered", {"id": generation_id, "steer_id": event.steer_id, "step": event.step}
    if isinstance(event, ProgressEvent):
        data = {"id": generation_id, "step": event.step, "total_steps": event.total_steps}
        if event.preview is not None:
            data["preview_b64"] = base64.b64encode(event.preview).decode()
        return "generation.progress", data
    timings = {"total_s": event.total_s, "first_step_s": event.first_step_s}
    return "generation.completed", {
        "id": generation_id,
        "b64_json": base64.b64encode(event.data).decode(),
        "seed": event.seed,
        "output_format": event.output_format,
        "timings": timings,
    }


async def steer(request):
    return await _on_owner(request, "rest.steer", _steer_here, "/steer")


async def delete(request):
    return await _on_owner(request, "rest.delete", _delete_here, "")


async def _steer_here(request, service: ImageService, generation_id: str, caller: str) -> web.Response:
    try:
        fields = grpc_api.to_steer(to_steer_message(await read_json(request)))
        steer_id = await service.steer(generation_id, caller, fields)
    except ApiError as error:
        raise error.renamed(REST_NAMES) from None
    return web.json_response({"id": generation_id, "steer_id": steer_id}, status=202)


def to_steer_message(body: dict):
    """The Steer a steer body spells (the gRPC message in JSON, `region_mode` as a word)."""
    check_json_types(body, images_pb2.Steer.DESCRIPTOR)
    body = dict(body)
    if not body:
        raise invalid(
            "body",
            "give at least one field to steer: prompt, negative_prompt, guidance_scale, regions "
            "(with region_divisions or their masks), base_prompt_weight, region_mode, mask",
        )
    if "region_mode" in body:
        words = ENUMS["region_mode"]
        if not isinstance(body["region_mode"], str) or body["region_mode"] not in words:
            raise invalid("region_mode", f"must be one of {', '.join(words)}, got {body['region_mode']!r}")
        body["region_mode"] = words[body["region_mode"]]
    try:
        return json_format.ParseDict(body, images_pb2.Steer())
    except json_format.ParseError as exc:
        raise invalid(_parse_error_field(str(exc)), str(exc).splitlines()[0]) from None


async def _delete_here(request, service: ImageService, generation_id: str, caller: str) -> web.Response:
    service.cancel(generation_id, caller)
    return web.json_response({"id": generation_id, "status": "cancelled"})


async def _on_owner(request, route: str, here, suffix: str):
    """Runs `here` when this replica owns the generation, else forwards the call to the owner
    (at /v1/generations/<id><suffix>, the id checked to be one)."""
    service: ImageService = request.app[SERVICE]
    replicas: Replicas = request.app[REPLICAS]
    generation_id = request.match_info["id"]
    with service.metrics.request(route, request["rid"]) as outcome:
        try:
            caller = service.identify(bearer(request.headers.get("Authorization")), request.remote or "-")
            if not is_id(generation_id):
                raise ApiError(NOT_FOUND, f"no generation with id {generation_id}")
            if replicas.is_mine(generation_id):
                response = await here(request, service, generation_id, caller)
                owner = service.replica
            elif FORWARDED_HEADER in request.headers:  # one hop only: the owner said it is not its id
                raise ApiError(NOT_FOUND, f"no generation with id {generation_id}")
            else:
                owner = replicas.owner_of(generation_id)
                url = f"{replicas.url_of(generation_id)}/v1/generations/{generation_id}{suffix}"
                response = await _forward(request, url, owner)
        except ApiError as error:
            response, owner = error_response(outcome.failed(error)), service.replica
        response.headers["X-Ldm-Replica"] = service.replica  # not the owner's, when forwarded
        response.headers["X-Ldm-Owner"] = owner
        return response


async def _forward(request, url: str, owner: str) -> web.Response:
    headers = {
        FORWARDED_HEADER: request.app[REPLICAS].name,
        "X-Request-Id": request["rid"],
        "Content-Type": "application/json",
    }
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    body = await request.read()
    try:
        async with request.app[PEER_SESSION].request(
            request.method, url, data=body, headers=headers, allow_redirects=False
        ) as answer:
            payload = await answer.read()
            return web.Response(body=payload, status=answer.status, content_type="application/json")
    except (aiohttp.ClientError, TimeoutError) as exc:
        if owner_gone(exc):
            raise ApiError(
                NOT_FOUND, f"no generation with id {request.match_info['id']} (its replica {owner} is gone)"
            ) from None
        raise ApiError(
            UNAVAILABLE, f"cannot reach replica {owner}, which runs this generation: {exc}", retry_after_s=1.0
        ) from None


async def page(request):
    return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})


def add_routes(app: web.Application, replicas: Replicas) -> None:
    app[REPLICAS] = replicas

    async def peer_session(app):
        app[PEER_SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30, connect=5))
        yield
        await app[PEER_SESSION].close()

    app.cleanup_ctx.append(peer_session)
    app.router.add_post("/v1/generations", create)
    app.router.add_post("/v1/generations/{id}/steer", steer)
    app.router.add_delete("/v1/generations/{id}", delete)
    app.router.add_get("/", page)
    app.router.add_get("/static/{path}", static_file)


async def static_file(request):
    """One of the page's own files: the folder's plain files only (no way out of it, no link
    followed out); anything else is the documented JSON 404 naming `path`."""
    name = request.match_info["path"]
    path = (STATIC / name).resolve()
    if path.parent != STATIC or not path.is_file():
        raise ApiError(NOT_FOUND, f"no file {name!r} here", "path")
    return web.FileResponse(path)
