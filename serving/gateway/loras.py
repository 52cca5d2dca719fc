"""The LoRA adapters the pipeline holds, as OpenAI-style REST resources and their gRPC twins:

    GET    /v1/loras[?model=]        {"object": "list", "data": [{"id", "object": "lora", "model", "resident"}]}
    GET    /v1/loras/{name}[?model=] one adapter object (404 when the pipeline holds none of that name)
    POST   /v1/loras                 multipart/form-data: file (a .safetensors LoRA), name (default: the file's
                                     stem), model (default: the server's default model) -> the adapter object
    DELETE /v1/loras/{name}[?model=] {"id", "object": "lora", "model", "deleted": true}

gRPC: ListLoras, LoadLora, UnloadLora of ldm.v1.Images (serving/gateway/grpc_api.py). Requests
name adapters in `loras: [{name, weight}]` (serving/gateway/generation.py) or with A1111's
`<lora:name:weight>` in the prompt.

Listing takes any key; uploading and removing change what the server holds for everyone, so with
API keys on they take an admin key (serving/gateway/access.py: 403 / PERMISSION_DENIED for
another). The pipeline does the work (LoRA control messages, serving/triton/loras.py): it reads
an upload once and refuses a file that is not a LoRA of the model naming why (400 naming
`file`: the first layer that does not fit, or "not a LoRA file"), a file over its
max_lora_file_mb (413), replacing or removing an adapter a running generation holds (409 /
FAILED_PRECONDITION), an unknown adapter (404 naming `name`). The upload is read as a stream, its
file part capped at that limit, whatever the gateway's --max-body-mb (adapters are often larger
than a request body); over gRPC LoadLora's message is capped by --max-body-mb too.
"""

from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from serving.core.errors import UNAVAILABLE
from serving.gateway.access import bearer
from serving.gateway.errors import NOT_FOUND, TOO_LARGE, ApiError, invalid

DEFAULT_MAX_FILE_MB = 64  # the pipeline's max_lora_file_mb when its config does not say
TEXT_FIELD_BYTES = 1024  # name and model: short texts
FORM_SLACK_BYTES = 64 * 1024  # multipart boundaries and part headers beyond the file
CHUNK = 256 * 1024


def entry(adapter: dict) -> dict:
    """An adapter object as the REST front shows it."""
    return {"id": adapter["id"], "object": "lora", "model": adapter["model"], "resident": bool(adapter["resident"])}


def list_body(adapters: list) -> dict:
    return {"object": "list", "data": [entry(a) for a in adapters]}


def max_file_bytes(service) -> int:
    """The pipeline's limit on an adapter file (its config parameter max_lora_file_mb)."""
    return service.pipeline.require_model().parameter("max_lora_file_mb", int, DEFAULT_MAX_FILE_MB) * 2**20


def _ready(service) -> None:
    if not service.ready:
        raise ApiError(
            UNAVAILABLE,
            f"the pipeline at {service.pipeline.url} is not ready (starting or shutting down); retry later",
            retry_after_s=2.0,
        )


async def list_adapters(service, model: str = "") -> list:
    _ready(service)
    return await service.pipeline.loras(model)


async def load(service, credential: str | None, name: str, data: bytes, model: str = "") -> dict:
    """Registers an uploaded adapter file; its adapter object. The caller is identified already."""
    service.access.require_admin(credential, "uploading a LoRA adapter")
    _ready(service)
    limit = max_file_bytes(service)
    if len(data) > limit:
        raise ApiError(
            TOO_LARGE,
            f"{len(data)} bytes; at most {limit} bytes per adapter file (the pipeline's max_lora_file_mb)",
            "file",
        )
    adapters = await service.pipeline.load_lora(name, data, model)
    return _find(adapters, name)


async def unload(service, credential: str | None, name: str, model: str = "") -> dict:
    service.access.require_admin(credential, "removing a LoRA adapter")
    _ready(service)
    adapters = await service.pipeline.unload_lora(name, model)
    served = adapters[0]["model"] if adapters else model
    return {"id": name, "object": "lora", "model": served, "deleted": True}


def _find(adapters: list, name: str) -> dict:
    for adapter in adapters:
        if adapter["id"] == name:
            return adapter
    raise ApiError(UNAVAILABLE, f"the pipeline did not list the adapter {name!r} it took; retry", retry_after_s=1.0)


# ---- REST ----------------------------------------------------------------------------------


def add_routes(app: web.Application, service_key) -> None:
    """The /v1/loras routes on the REST application (its ImageService under `service_key`)."""

    def credential_of(request, service):
        """The caller's key (None without one), identified: 401 for a missing or unknown key."""
        credential = bearer(request.headers.get("Authorization"))
        service.identify(credential, request.remote or "-")
        return credential

    async def get_list(request):
        service = request.app[service_key]
        with service.metrics.request("rest.loras", request["rid"]):
            credential_of(request, service)
            return web.json_response(list_body(await list_adapters(service, _query(request, "model"))))

    async def get_one(request):
        service = request.app[service_key]
        name = request.match_info["name"]
        with service.metrics.request("rest.loras", request["rid"]):
            credential_of(request, service)
            for adapter in await list_adapters(service, _query(request, "model")):
                if adapter["id"] == name:
                    return web.json_response(entry(adapter))
            raise ApiError(NOT_FOUND, f"no adapter named {name!r} (GET /v1/loras lists them)", "name")

    async def post(request):
        service = request.app[service_key]
        with service.metrics.request("rest.loras.upload", request["rid"]):
            credential = credential_of(request, service)
            service.access.require_admin(credential, "uploading a LoRA adapter")  # before the body is read
            _ready(service)
            name, data, model = await read_upload(request, max_file_bytes(service))
            return web.json_response(entry(await load(service, credential, name, data, model)))

    async def delete(request):
        service = request.app[service_key]
        with service.metrics.request("rest.loras.delete", request["rid"]):
            credential = credential_of(request, service)
            return web.json_response(
                await unload(service, credential, request.match_info["name"], _query(request, "model"))
            )

    app.router.add_get("/v1/loras", get_list)
    app.router.add_post("/v1/loras", post)
    app.router.add_get("/v1/loras/{name}", get_one)
    app.router.add_delete("/v1/loras/{name}", delete)


def _query(request, name: str) -> str:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise invalid(name, "give it once")
    return values[0] if values else ""


async def read_upload(request, limit: int) -> tuple:
    """(name, file bytes, model) of a multipart upload, read as a stream: the file part may hold
    `limit` bytes (413 beyond, without reading the rest), the texts 1 KiB; 400 naming what is
    missing, repeated or unknown."""
    if not request.content_type.startswith("multipart/form-data"):
        raise invalid("body", "must be multipart/form-data with a `file` part (and optional `name`, `model`)")
    if request.content_length is not None and request.content_length > limit + FORM_SLACK_BYTES:
        raise ApiError(
            TOO_LARGE,
            f"the upload is {request.content_length} bytes; an adapter file may have at most "
            f"{limit} bytes (the pipeline's max_lora_file_mb)",
            "file",
        )
    fields: dict[str, bytes | str] = {}
    filename = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            key = part.name or ""
            if key not in ("file", "name", "model"):
                raise invalid(key or "body", "unknown form field; an upload takes file, name and model")
            if key in fields:
                raise invalid(key, "give it once")
            cap = limit if key == "file" else TEXT_FIELD_BYTES
            data = await _read_part(part, cap)
            if data is None:
                if key == "file":
                    raise ApiError(
                        TOO_LARGE,
                        f"over {limit} bytes; an adapter file may have at most {limit} bytes (the "
                        "pipeline's max_lora_file_mb)",
                        "file",
                    )
                raise invalid(key, f"at most {cap} bytes")
            if key == "file":
                filename = part.filename
                fields[key] = data
            else:
                try:
                    fields[key] = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise invalid(key, "must be UTF-8 text") from None
    except (ValueError, AssertionError, BadHttpMessage) as exc:  # no boundary, a bad part header, ...
        raise invalid("body", f"is not well-formed multipart/form-data: {exc}") from None
    if "file" not in fields:
        raise invalid("file", "is required: the adapter's .safetensors file")
    name = fields.get("name") or (Path(filename).stem if filename else "")
    if not name:
        raise invalid(
            "name", "is required when the file part has no filename (the adapter is named by the file's stem)"
        )
    return name, fields["file"], fields.get("model", "")


async def _read_part(part, cap: int) -> bytes | None:
    """The part's bytes, or None once it holds more than `cap` (the rest is not read)."""
    chunks, size = [], 0
    while chunk := await part.read_chunk(CHUNK):
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
