"""The gRPC front: service `ldm.v1.Images` (proto/ldm/v1/images.proto; its Session in
serving/gateway/grpc_session.py), with gRPC health
checking (`grpc.health.v1.Health`: "" and "ldm.v1.Images" follow the pipeline's readiness) and
server reflection. Errors are status codes; a field error carries google.rpc.BadRequest, a
rate limit google.rpc.RetryInfo.

The request id travels in the trailing metadata (`x-request-id`) and in the messages, not in
early headers: a proxy (nginx, an Ingress) that has not yet sent response headers answers a
replica that dies mid-call with 502, which clients see as UNAVAILABLE and retry; once headers
are out it can only reset the stream, which they see as INTERNAL."""

from typing import Any
from collections import namedtuple
import math

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from serving.gateway import grpc_session, images, loras, models
from serving.gateway.access import bearer
from serving.gateway.errors import GRPC_STATUS, ApiError, invalid
from serving.gateway.generation import FIELD_NAMES, PAIRS, Generation, lora_inputs
from serving.gateway.protos import images_pb2, images_pb2_grpc
from serving.gateway.samplers import served_samplers
from serving.gateway.service import EncodedImage, ImageService
from serving.gateway.telemetry import REQUEST_ID_HEADER, request_id, unexpected

SERVICE = images_pb2.DESCRIPTOR.services_by_name["Images"].full_name
FORMATS = {
    images_pb2.IMAGE_FORMAT_UNSPECIFIED: "png",
    images_pb2.IMAGE_FORMAT_PNG: "png",
    images_pb2.IMAGE_FORMAT_JPEG: "jpeg",
    images_pb2.IMAGE_FORMAT_WEBP: "webp",
}
FORMAT_ENUM = {
    "png": images_pb2.IMAGE_FORMAT_PNG,
    "jpeg": images_pb2.IMAGE_FORMAT_JPEG,
    "webp": images_pb2.IMAGE_FORMAT_WEBP,
}
TASKS = {
    images_pb2.TASK_TXT2IMG: "txt2img",
    images_pb2.TASK_IMG2IMG: "img2img",
    images_pb2.TASK_INPAINT: "inpaint",
    images_pb2.TASK_UPSCALE: "upscale",
}
REGION_MODES = {images_pb2.REGION_MODE_LATENT: "latent", images_pb2.REGION_MODE_ATTENTION: "attention"}
# optional scalar fields of GenerateRequest that are pipeline inputs of the same name
SCALARS = (
    "steps",
    "guidance_scale",
    "height",
    "width",
    "eta",
    "timeout_s",
    "strength",
    "mask_blur",
    "keep_unmasked",
    "noise_level",
    "base_prompt_weight",
)


def to_generation(request, streaming: bool) -> Generation:
    """The Generation a GenerateRequest spells; its images are Uploads, not yet read (the
    service checks and decodes them in order)."""
    inputs = {name: getattr(request, name) for name in SCALARS if request.HasField(name)}
    if request.negative_prompt:
        inputs["negative_prompt"] = request.negative_prompt
    for name in ("model", "sampler", "sigma_schedule"):  # empty: the served pipeline's default
        if getattr(request, name):
            inputs[name] = getattr(request, name)
    for name in ("guidance_interval", *PAIRS):
        if getattr(request, name):
            inputs[name] = list(getattr(request, name))
    if request.task:
        inputs["task"] = enum_word(TASKS, "task", request.task)
    if request.init_image:
        inputs["init_image"] = images.Upload(request.init_image, "init_image")
    if request.mask:
        inputs["mask"] = images.Upload(request.mask, "mask", mask=True)
    # a region left without a negative prompt takes the request's, as when no region names one
    inputs.update(region_inputs(request, lambda region: region.negative_prompt or request.negative_prompt))
    inputs.update(lora_inputs([(lora.name, lora.weight if lora.HasField("weight") else 1.0) for lora in request.loras]))
    progress_every = request.progress_every if request.HasField("progress_every") else 1
    return Generation(
        prompt=request.prompt,
        inputs=inputs,
        n=request.n or 1,
        seed=request.seed if request.HasField("seed") else None,
        output_format=enum_word(FORMATS, "output_format", request.output_format),
        quality=request.quality if request.HasField("quality") else 90,
        progress_every=progress_every if streaming else 0,
        preview_every=request.preview_every if streaming else 0,
    )


def samplers_message(model, name: str = "") -> "images_pb2.ListSamplersResponse":
    """ListSamplers' answer for the served model `name` ("": the default) of the served pipeline
    `model` (None: not known yet)."""
    served = served_samplers(model, name)
    response = images_pb2.ListSamplersResponse()
    for entry in served.samplers:
        response.samplers.add(**entry)  # fits_served_model, when known, is a field like the others
    if served.default is not None:
        response.default_sampler, response.default_sigma_schedule = served.default
    return response


def models_message(model) -> "images_pb2.ListModelsResponse":
    """ListModels' answer for the served pipeline `model` (serving/gateway/models.py)."""
    response = images_pb2.ListModelsResponse()
    for served in models.served_models(model):
        sampler, schedule = served.default_sampler or ("", "")
        response.models.add(
            id=served.id,
            family=served.family,
            is_default=served.default,
            native_size=served.native_size,
            max_size=served.max_size,
            tasks=served.tasks,
            default_sampler=sampler,
            default_sigma_schedule=schedule,
            created=model.read_at,
        )
    return response


def lora_message(adapter: dict) -> "images_pb2.LoraInfo":
    return images_pb2.LoraInfo(id=adapter["id"], model=adapter["model"], resident=bool(adapter["resident"]))


def enum_word(words: dict, field: str, value: int) -> str:
    """The word of an enum value; proto3 enums are open, so a client may send a number this
    server does not know: INVALID_ARG naming the field."""
    if value not in words:
        raise invalid(field, f"unknown value {value}; one of {', '.join(f'{v} ({w})' for v, w in words.items() if v)}")
    return words[value]


def to_steer(steer) -> dict:
    """The pipeline inputs of a Steer (the fields it gives); images as Uploads."""
    inputs = {
        name: getattr(steer, name)
        for name in ("prompt", "negative_prompt", "guidance_scale", "base_prompt_weight")
        if steer.HasField(name)
    }
    if steer.mask:
        inputs["mask"] = images.Upload(steer.mask, "mask", mask=True)
    inputs.update(lora_inputs([(lora.name, lora.weight if lora.HasField("weight") else 1.0) for lora in steer.loras]))

    def negative(region):  # the generation's current negative prompt is the pipeline's to know
        raise invalid("regions.negative_prompt", "give every region of a steer a negative_prompt, or none")

    inputs.update(region_inputs(steer, negative))
    return inputs


def region_inputs(message, negative_of) -> dict:
    """The region inputs of a GenerateRequest or Steer; negative_of(region) is the negative
    prompt of a region without one when others have one."""
    inputs: dict[str, Any] = {}
    if message.regions:
        inputs["region_prompts"] = [r.prompt for r in message.regions]
        if any(r.negative_prompt for r in message.regions):
            inputs["region_negative_prompts"] = [r.negative_prompt or negative_of(r) for r in message.regions]
        masks = [r.mask for r in message.regions]
        if any(masks):
            if not all(masks):
                raise invalid("regions.mask", "give every region a mask, or none (then region_divisions)")
            inputs["region_masks"] = [images.Upload(m, "region_masks", mask=True) for m in masks]
    if message.region_divisions:
        inputs["region_divisions"] = message.region_divisions
    if message.region_mode:
        inputs["region_mode"] = enum_word(REGION_MODES, "region_mode", message.region_mode)
    return inputs


def to_message(image: EncodedImage):
    timings = images_pb2.Timings(total_s=image.total_s)
    if image.first_step_s is not None:
        timings.first_step_s = image.first_step_s
    return images_pb2.GeneratedImage(
        index=image.index,
        seed=image.seed,
        data=image.data,
        format=FORMAT_ENUM[image.output_format],
        width=image.width,
        height=image.height,
        timings=timings,
    )


class _Status(namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


def status_of(error: ApiError, rid: str | None = None) -> grpc.Status:
    code = GRPC_STATUS[error.code]
    details = []
    if error.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    if error.retry_after_s:
        seconds = math.ceil(error.retry_after_s)
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds)))
    packed = []
    for detail in details:
        message = any_pb2.Any()
        message.Pack(detail)
        packed.append(message)
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=str(error), details=packed))
    extra = ((REQUEST_ID_HEADER, rid),) if rid else ()
    return _Status(status.code, status.details, tuple(status.trailing_metadata) + extra)


def peer_address(peer: str) -> str:
    """The client's address without its port: "ipv4:10.0.0.7:51234" -> "10.0.0.7" (the rate
    limit of callers without keys is per address, not per connection)."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return host.strip("[]")
    return peer


async def abort(context, outcome, exc: Exception, rid: str) -> None:
    """Ends a call with its error's status: an ApiError's own, naming the field as this front
    spells it; anything nobody coded, INTERNAL with the request id (never a bare UNKNOWN)."""
    error = exc if isinstance(exc, ApiError) else unexpected(exc, rid)
    await context.abort_with_status(status_of(outcome.failed(error).renamed(FIELD_NAMES), rid))


class ImagesServicer(images_pb2_grpc.ImagesServicer):
    def __init__(self, service: ImageService):
        self.service = service

    def _start(self, context):
        metadata = dict(context.invocation_metadata() or ())
        rid = request_id(metadata.get(REQUEST_ID_HEADER))
        context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
        return rid, metadata

    async def _admit(self, request, context, metadata, streaming: bool) -> Generation:
        caller = self.service.identify(bearer(metadata.get("authorization")), peer_address(context.peer()))
        generation = to_generation(request, streaming)
        await self.service.admit(generation, caller)
        await self.service.decode(generation)
        return generation

    async def Generate(self, request, context):
        rid, metadata = self._start(context)
        with self.service.metrics.request("grpc.Generate", rid) as outcome:
            try:
                generation = await self._admit(request, context, metadata, False)
                done = {}
                async for event in self.service.events(generation, rid, "grpc.Generate"):
                    if isinstance(event, EncodedImage):
                        done[event.index] = to_message(event)
                outcome.images = len(done)
                return images_pb2.GenerateResponse(images=[done[i] for i in sorted(done)], request_id=rid)
            except Exception as exc:
                await abort(context, outcome, exc, rid)

    async def GenerateStream(self, request, context):
        rid, metadata = self._start(context)
        with self.service.metrics.request("grpc.GenerateStream", rid) as outcome:
            try:
                generation = await self._admit(request, context, metadata, True)
                async for event in self.service.events(generation, rid, "grpc.GenerateStream"):
                    if isinstance(event, EncodedImage):
                        outcome.images += 1
                        yield images_pb2.GenerateEvent(image=to_message(event), request_id=rid)
                    else:
                        yield images_pb2.GenerateEvent(progress=grpc_session.progress_message(event), request_id=rid)
            except Exception as exc:
                await abort(context, outcome, exc, rid)

    async def ListSamplers(self, request, context):
        rid, metadata = self._start(context)
        with self.service.metrics.request("grpc.ListSamplers", rid) as outcome:
            try:
                self.service.identify(bearer(metadata.get("authorization")), peer_address(context.peer()))
                return samplers_message(self.service.pipeline.model, request.model)
            except Exception as exc:
                await abort(context, outcome, exc, rid)

    async def ListModels(self, request, context):
        rid, metadata = self._start(context)
        with self.service.metrics.request("grpc.ListModels", rid) as outcome:
            try:
                self.service.identify(bearer(metadata.get("authorization")), peer_address(context.peer()))
                return models_message(self.service.pipeline.require_model())
            except Exception as exc:
                await abort(context, outcome, exc, rid)

    async def ListLoras(self, request, context):
        rid, metadata = self._start(context)
        with self.service.metrics.request("grpc.ListLoras", rid) as outcome:
            try:
                self.service.identify(bearer(metadata.get("authorization")), peer_address(context.peer()))
                adapters = await loras.list_adapters(self.service, request.model)
                return images_pb2.ListLorasResponse(loras=[lora_message(a) for a in adapters])
            except Exception as exc:
                await abort(context, outcome, exc, rid)

    async def LoadLora(self, request, context):
        rid, metadata = self._start(context)
        with self.service.metrics.request("grpc.LoadLora", rid) as outcome:
            try:
                credential = bearer(metadata.get("authorization"))
                self.service.identify(credential, peer_address(context.peer()))
                if not request.name:
                    raise invalid("name", "is required (1-64 letters, digits, '.', '_' or '-')")
                if not request.file:
                    raise invalid("file", "is required: the adapter's .safetensors file")
                return lora_message(
                    await loras.load(self.service, credential, request.name, request.file, request.model)
                )
            except Exception as exc:
                await abort(context, outcome, exc, rid)

    async def UnloadLora(self, request, context):
        rid, metadata = self._start(context)
        with self.service.metrics.request("grpc.UnloadLora", rid) as outcome:
            try:
                credential = bearer(metadata.get("authorization"))
                self.service.identify(credential, peer_address(context.peer()))
                if not request.name:
                    raise invalid("name", "is required")
                answer = await loras.unload(self.service, credential, request.name, request.model)
                return images_pb2.UnloadLoraResponse(id=answer["id"], model=answer["model"])
            except Exception as exc:
                await abort(context, outcome, exc, rid)

    async def Session(self, request_iterator, context):
        rid, metadata = self._start(context)
        with self.service.metrics.request(grpc_session.ROUTE, rid) as outcome:
            try:
                caller = self.service.identify(bearer(metadata.get("authorization")), peer_address(context.peer()))
                async for event in grpc_session.session(
                    self.service,
                    request_iterator,
                    caller,
                    rid,
                    outcome,
                    lambda request: to_generation(request, True),
                    to_steer,
                    to_message,
                ):
                    yield event
            except Exception as exc:
                await abort(context, outcome, exc, rid)


def add_services(server, service: ImageService) -> health.aio.HealthServicer:
    """Adds Images, health and reflection to `server`; returns the health servicer to update."""
    images_pb2_grpc.add_ImagesServicer_to_server(ImagesServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return health_servicer


async def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await health_servicer.set(name, status)
