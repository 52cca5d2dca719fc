"""Typed Python client of the gateway's gRPC API, `ldm.v1.Images` (proto/ldm/v1/images.proto).

    from serving.client.images import ImagesClient
    with ImagesClient("localhost:50051") as client:
        for image in client.generate("a red circle", n=2, seed=7, steps=25):
            image.save(f"circle-{image.seed}.png")
        client.generate("a red circle", seed=7, steps=15, sampler="DPM++ 2M Karras", guidance_interval=(0.2, 0.8))
        [s["name"] for s in client.samplers() if s["fits_served_model"]]
        [m["id"] for m in client.models()]                    # the served models, the default first
        client.generate("a red circle", model="sdxl", original_size=(1024, 1024), target_size=(1024, 1024))
        client.load_lora("ink", Path("ink.safetensors"))      # an admin key when the server has keys
        [a["id"] for a in client.loras()]                     # the adapters the server holds
        client.generate("a red circle", loras=[("ink", 0.8)]) # or "<lora:ink:0.8>" in the prompt

`generate` is retried (serving/client/retry.py's policy: UNAVAILABLE, jittered backoff) only
when the request has a seed: then a replay gives the same images, so it is idempotent; without
one the server draws a seed and a replay would be a different request. Streams are not retried.
Errors raise `ImagesError` with the gRPC code name and, for a bad field, its name.
"""

from dataclasses import dataclass
import io
from pathlib import Path
from collections.abc import Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
import numpy as np

from serving.client.loras import lora_pairs
from serving.client.retry import RetryPolicy, call_with_retry
from serving.gateway.protos import images_pb2, images_pb2_grpc

FORMATS = {
    "png": images_pb2.IMAGE_FORMAT_PNG,
    "jpeg": images_pb2.IMAGE_FORMAT_JPEG,
    "webp": images_pb2.IMAGE_FORMAT_WEBP,
}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
TASKS = {
    "txt2img": images_pb2.TASK_TXT2IMG,
    "img2img": images_pb2.TASK_IMG2IMG,
    "inpaint": images_pb2.TASK_INPAINT,
    "upscale": images_pb2.TASK_UPSCALE,
}
REGION_MODES = {"latent": images_pb2.REGION_MODE_LATENT, "attention": images_pb2.REGION_MODE_ATTENTION}
IMAGE_FIELDS = ("init_image", "mask")


class ImagesError(Exception):
    """A call that ended with a gRPC status other than OK."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.field = code, message, field

    def status(self) -> str:  # what the retry policy reads
        return self.code

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "ImagesError":
        field = None
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                field = bad.field_violations[0].field if bad.field_violations else None
        return cls(error.code().name, error.details() or "", field)


@dataclass
class Image:
    index: int
    seed: int
    data: bytes  # encoded as `format`
    format: str
    width: int
    height: int
    total_s: float

    def array(self) -> np.ndarray:
        """uint8 [H, W, 3]."""
        from PIL import Image as PILImage

        return np.asarray(PILImage.open(io.BytesIO(self.data)).convert("RGB"))

    def save(self, path) -> None:
        Path(path).write_bytes(self.data)


@dataclass
class Progress:
    index: int
    step: int
    total_steps: int
    preview: bytes  # PNG, or b"" when this event has none


def _image(message) -> Image:
    return Image(
        message.index,
        message.seed,
        message.data,
        FORMAT_NAMES.get(message.format, "png"),
        message.width,
        message.height,
        message.timings.total_s,
    )


def _image_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    from PIL import Image as PILImage

    picture = PILImage.fromarray(value) if isinstance(value, np.ndarray) else value
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def build_request(prompt: str, n: int = 1, seed: int | None = None, output_format: str = "png", **fields):
    """A GenerateRequest; fields are the message's (images as bytes, numpy arrays or PIL images;
    `regions` as a list of dicts with prompt, negative_prompt, mask; task and region_mode by name;
    `guidance_interval` as (lo, hi); `model` a served model's id; SDXL's `original_size`,
    `target_size` as (height, width) and `crop_top_left` as (top, left); `loras` as (name, weight)
    pairs, {name, weight} dicts or "NAME:WEIGHT" texts)."""
    request = images_pb2.GenerateRequest(prompt=prompt, n=n, output_format=FORMATS[output_format])
    if seed is not None:
        request.seed = seed
    for name, value in fields.items():
        if value is None:
            continue
        if name in IMAGE_FIELDS:
            value = _image_bytes(value)
        elif name == "task":
            value = TASKS[value]
        elif name == "region_mode":
            value = REGION_MODES[value]
        elif name == "loras":
            for lora_name, weight in lora_pairs(value):
                request.loras.add(name=lora_name, weight=weight)
            continue
        elif name == "regions":
            for region in value:
                mask = region.get("mask")
                request.regions.add(
                    prompt=region["prompt"],
                    negative_prompt=region.get("negative_prompt", ""),
                    mask=_image_bytes(mask) if mask is not None else b"",
                )
            continue
        field = images_pb2.GenerateRequest.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            raise TypeError(f"unknown field {name!r} of ldm.v1.GenerateRequest")
        if field.is_repeated:  # guidance_interval, SDXL's sizes
            getattr(request, name).extend(value.tolist() if isinstance(value, np.ndarray) else value)
            continue
        setattr(request, name, value)
    return request


class ImagesClient:
    def __init__(
        self,
        url: str = "localhost:50051",
        api_key: str | None = None,
        timeout_s: float = 600.0,
        policy: RetryPolicy = RetryPolicy(),
        channel_options=(),
    ):
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1), *channel_options]
        self.channel = grpc.insecure_channel(url, options=options)
        self.stub = images_pb2_grpc.ImagesStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s
        self.policy = policy

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompt: str, n: int = 1, seed: int | None = None, output_format: str = "png", **fields) -> list:
        """The n images, ordered by index; raises ImagesError."""
        request = build_request(prompt, n, seed, output_format, **fields)

        def call():
            try:
                return self.stub.Generate(request, timeout=self.timeout_s, metadata=self.metadata)
            except grpc.RpcError as error:
                raise ImagesError.from_rpc(error) from None

        response = call_with_retry(call, self.policy) if seed is not None else call()
        return [_image(m) for m in response.images]

    def models(self) -> list:
        """The models the server serves (ListModels), the default first, as dicts: id, family,
        is_default, native_size, max_size, tasks, default_sampler, default_sigma_schedule, created."""

        def call():
            try:
                return self.stub.ListModels(
                    images_pb2.ListModelsRequest(), timeout=self.timeout_s, metadata=self.metadata
                )
            except grpc.RpcError as error:
                raise ImagesError.from_rpc(error) from None

        response = call_with_retry(call, self.policy)
        return [
            dict(
                id=m.id,
                family=m.family,
                is_default=m.is_default,
                native_size=m.native_size,
                max_size=m.max_size,
                tasks=list(m.tasks),
                default_sampler=m.default_sampler,
                default_sigma_schedule=m.default_sigma_schedule,
                created=m.created,
            )
            for m in response.models
        ]

    def loras(self, model: str = "") -> list:
        """The LoRA adapters the server holds (ListLoras; of `model`, default every model's), as
        dicts: id, model, resident."""
        response = call_with_retry(
            lambda: self._call(self.stub.ListLoras, images_pb2.ListLorasRequest(model=model)), self.policy
        )
        return [dict(id=a.id, model=a.model, resident=a.resident) for a in response.loras]

    def load_lora(self, name: str, file, model: str = "") -> dict:
        """Uploads a LoRA file (a path or its bytes) under `name` (LoadLora); its entry."""
        data = file if isinstance(file, (bytes, bytearray)) else Path(file).read_bytes()
        a = self._call(self.stub.LoadLora, images_pb2.LoadLoraRequest(name=name, file=bytes(data), model=model))
        return dict(id=a.id, model=a.model, resident=a.resident)

    def unload_lora(self, name: str, model: str = "") -> None:
        """Removes an adapter (UnloadLora)."""
        self._call(self.stub.UnloadLora, images_pb2.UnloadLoraRequest(name=name, model=model))

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as error:
            raise ImagesError.from_rpc(error) from None

    def samplers(self, model: str = "") -> list:
        """The samplers the server knows (ListSamplers), as dicts: name, description, a1111_names,
        sigma_schedules, fits, parameters, fits_served_model (whether it fits `model`, default the
        server's default model; None when the server does not say)."""

        def call():
            try:
                return self.stub.ListSamplers(
                    images_pb2.ListSamplersRequest(model=model), timeout=self.timeout_s, metadata=self.metadata
                )
            except grpc.RpcError as error:
                raise ImagesError.from_rpc(error) from None

        response = call_with_retry(call, self.policy)
        return [
            dict(
                name=s.name,
                description=s.description,
                a1111_names=list(s.a1111_names),
                sigma_schedules=list(s.sigma_schedules),
                fits=s.fits,
                parameters=list(s.parameters),
                fits_served_model=s.fits_served_model if s.HasField("fits_served_model") else None,
            )
            for s in response.samplers
        ]

    def stream(
        self, prompt: str, n: int = 1, seed: int | None = None, output_format: str = "png", **fields
    ) -> Iterator:
        """Progress events (every `progress_every` steps, default 1), then each Image as it is done.
        Leaving the loop early cancels the generation."""
        call = self.stub.GenerateStream(
            build_request(prompt, n, seed, output_format, **fields), timeout=self.timeout_s, metadata=self.metadata
        )
        try:
            for event in call:
                if event.HasField("image"):
                    yield _image(event.image)
                else:
                    p = event.progress
                    yield Progress(p.index, p.step, p.total_steps, p.preview)
        except grpc.RpcError as error:
            raise ImagesError.from_rpc(error) from None
        finally:
            call.cancel()
