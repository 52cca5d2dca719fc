"""What both fronts (gRPC `ldm.v1.Images`, REST `/v1/images/*`) share: admission, the pipeline
stream, image encoding, metrics. A front turns its wire format into a `Generation`, calls
`admit` and `events`, and writes the events out in its own format."""
from dataclasses import dataclass
from typing import AsyncIterator

from serving.core.errors import UNAVAILABLE
from serving.gateway import images
from serving.gateway.access import Access
from serving.gateway.errors import ApiError
from serving.gateway.generation import Generation
from serving.gateway.pipeline import Finished, PipelineClient
from serving.gateway.telemetry import GatewayMetrics


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 2**20  # a REST body or a gRPC message
    max_image_pixels: int = 4096 * 4096  # each uploaded image, read from its header


@dataclass
class ProgressEvent:
    index: int
    step: int
    total_steps: int
    preview: bytes | None  # PNG


@dataclass
class EncodedImage:
    index: int
    seed: int
    data: bytes
    output_format: str
    height: int
    width: int
    total_s: float
    first_step_s: float | None


class ImageService:
    def __init__(self, pipeline: PipelineClient, access: Access = None, metrics: GatewayMetrics = None,
                 limits: Limits = Limits()):
        self.pipeline = pipeline
        self.access = access or Access()
        self.metrics = metrics or GatewayMetrics()
        self.limits = limits
        self.ready = False  # kept up to date by the gateway's readiness watch

    def identify(self, credential: str | None, address: str) -> str:
        """The caller (first thing a front does: a request without a valid key learns nothing more)."""
        return self.access.identify(credential, address)

    def admit(self, generation: Generation, caller: str) -> None:
        """Checks what the gateway owns of the request and that the pipeline takes it, then
        charges the caller's rate limit."""
        generation.validate()
        if not self.ready:
            raise ApiError(UNAVAILABLE, f"the pipeline at {self.pipeline.url} is not ready (starting or shutting down); "
                           "retry later", retry_after_s=2.0)
        generation.check_declared(self.pipeline.require_model().inputs)
        self.access.charge(caller, generation.n)

    def default_steps(self) -> int:
        return self.pipeline.require_model().parameter("default_steps", int, 25)

    async def events(self, generation: Generation, rid: str, route: str) -> AsyncIterator:
        """ProgressEvent (as the stream asked for them) and one EncodedImage per image."""
        seen_preview = False
        async for event in self.pipeline.generate(generation, rid):
            if isinstance(event, Finished):
                if event.first_step_s is not None:
                    self.metrics.queue_wait.labels(route).observe(event.first_step_s)
                yield encoded(event, generation)
                continue
            preview = None
            if event.preview is not None:
                if not seen_preview:
                    seen_preview = True
                    self.metrics.first_preview.labels(route).observe(event.elapsed_s)
                preview = preview_png(event.preview, generation)
            yield ProgressEvent(event.index, event.step, event.total_steps, preview)


def encoded(event: Finished, generation: Generation) -> EncodedImage:
    height, width = event.image.shape[:2]
    data = images.encode(event.image, generation.output_format, generation.quality)
    return EncodedImage(event.index, event.seed, data, generation.output_format, height, width, event.total_s, event.first_step_s)


def preview_png(preview, generation: Generation) -> bytes:
    """A preview at the request's size when it gave one, else at the latent resolution it has."""
    size = generation.inputs.get("height"), generation.inputs.get("width")
    if all(size):
        preview = images.resized(preview, *size)
    return images.encode(preview, "png")
