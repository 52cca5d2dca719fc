"""What both fronts (gRPC `ldm.v1.Images`, REST `/v1/images/*`) share: admission, the pipeline
stream, image encoding, metrics. A front turns its wire format into a `Generation`, calls
`admit` and `events`, and writes the events out in its own format.

Live generations (REST `/v1/generations`, gRPC `Session`) are admitted with `start_live`, which
gives them an id and a place in the live table; their events include `SteerApplied`, and
`steer` / `cancel` act on them by id."""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import math
from collections.abc import AsyncIterator

from serving.core.errors import CANCELLED, UNAVAILABLE
from families.contracts import MAX_REGIONS
from serving.core.steering import STEERABLE  # the pipeline inputs a steer may give
from serving.gateway import images
from serving.gateway.access import Access
from serving.gateway.capacity import Capacity
from serving.gateway.costs import steer_units, work_units
from serving.gateway.errors import TOO_LARGE, ApiError, invalid
from serving.gateway.generation import Generation, check_texts
from serving.gateway.live import LiveGeneration, LiveTable, new_id
from serving.gateway.models import resolve
from serving.gateway.pipeline import Finished, PipelineClient
from serving.gateway.telemetry import GatewayMetrics, triton_prefix


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 2**20  # a REST body or a gRPC message
    max_image_pixels: int = 4096 * 4096  # each uploaded image, read from its header
    max_request_pixels: int = 2 * 4096 * 4096  # all uploaded images of one request or steer together
    decode_workers: int = 2  # threads decoding uploads (off the event loop); more requests wait their turn


@dataclass
class ProgressEvent:
    index: int
    step: int
    total_steps: int
    preview: bytes | None  # PNG


@dataclass
class SteerApplied:
    """Steer `steer_id` was first used by denoising step `step` (0-based) of image `index`."""

    index: int
    steer_id: int
    step: int


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
    def __init__(
        self,
        pipeline: PipelineClient,
        access: Access = None,
        metrics: GatewayMetrics = None,
        limits: Limits = Limits(),
        replica: str = "local",
        capacity: Capacity = None,
    ):
        self.pipeline = pipeline
        self.access = access or Access()
        self.metrics = metrics or GatewayMetrics()
        self.limits = limits
        self.replica = replica  # this gateway's name: the prefix of the ids of its live generations
        self.live = LiveTable()
        self.capacity = capacity or Capacity()  # the pipeline's slots, kept current by the readiness watch
        self.ready = False  # kept up to date by the gateway's readiness watch
        self._decoding = ThreadPoolExecutor(limits.decode_workers, thread_name_prefix="decode")

    def identify(self, credential: str | None, address: str) -> str:
        """The caller (first thing a front does: a request without a valid key learns nothing more)."""
        return self.access.identify(credential, address)

    async def admit(self, generation: Generation, caller: str) -> None:
        """Checks what the gateway owns of the request, the model it names (NOT_FOUND naming an
        unknown one: serving/gateway/models.py), that the pipeline takes it and what its uploads
        declare (`check_uploads`), waits for room in the pipeline
        (serving/gateway/capacity.py: the excess is refused here), then charges the caller's rate
        limit in work units (serving/gateway/costs.py). Nothing is decoded yet: `decode` follows.
        A front hands an admitted generation to `events` at once, which takes its slots."""
        generation.validate()
        if not self.ready:
            raise ApiError(
                UNAVAILABLE,
                f"the pipeline at {self.pipeline.url} is not ready (starting or shutting down); retry later",
                retry_after_s=2.0,
            )
        resolve(generation.inputs, self.pipeline.require_model())
        generation.check_declared(self.pipeline.require_model().inputs)
        self.check_uploads(generation.inputs)
        await self.capacity.wait_for_room(generation.n, caller)
        units = work_units(generation, self.pipeline.require_model())
        self.access.charge(caller, units)
        generation.caller, generation.charged = caller, units

    def refund(self, generation: Generation) -> None:
        """Nothing is charged for a request refused before it ran."""
        if generation.charged:
            self.access.refund(generation.caller, generation.charged)
            generation.charged = 0.0

    def check_uploads(self, inputs: dict) -> None:
        """Before any pixel is decoded: the counts (regions within the pipeline's limit, one mask
        per region), each upload's header (format, its pixels), then all of them together."""
        regions = inputs.get("region_prompts")
        if regions is not None:
            limit = self.pipeline.require_model().parameter("max_regions", int, MAX_REGIONS)
            if len(regions) > limit:
                raise invalid("region_prompts", f"at most {limit} regions, got {len(regions)}")
        masks = inputs.get("region_masks")
        if isinstance(masks, list) and len(masks) != len(regions or ()):
            raise invalid("region_masks", f"give one mask per region: {len(regions or ())} regions, {len(masks)} masks")
        found = images.uploads(inputs)
        total = sum(upload.declare(self.limits.max_image_pixels) for upload in found)
        if total > self.limits.max_request_pixels:
            raise ApiError(
                TOO_LARGE,
                f"the images of one request may have {self.limits.max_request_pixels} pixels "
                f"together, these have {total}",
                found[0].field,
            )

    async def decode(self, generation: Generation, work=images.decode_inputs) -> None:
        """Replaces the generation's Uploads (checked by `admit`) by their pixels: work(inputs)
        gives the decoded inputs."""
        if images.uploads(generation.inputs):
            try:
                generation.inputs.update(await self.in_pool(work, generation.inputs))
            except ApiError:
                self.refund(generation)
                raise

    async def in_pool(self, work, *args):
        """work(*args) on the decoding threads: decoding never blocks the event loop, and at most
        `decode_workers` images expand at once."""
        return await asyncio.get_running_loop().run_in_executor(self._decoding, work, *args)

    def default_steps(self) -> int:
        return self.pipeline.require_model().parameter("default_steps", int, 25)

    async def events(self, generation: Generation, rid: str, route: str, live: LiveGeneration = None) -> AsyncIterator:
        """ProgressEvent (as the stream asked for them) and one EncodedImage per image; for a
        live generation also a SteerApplied before the event of the step that first used it."""
        self.capacity.take(generation.n, generation.caller)
        try:
            async for event in self._events(generation, rid, route, live):
                yield event
        finally:
            self.capacity.release(generation.n, generation.caller)

    async def _events(self, generation: Generation, rid: str, route: str, live: LiveGeneration = None) -> AsyncIterator:
        seen_preview = False
        attach = live.attach if live is not None else None
        # a live generation's id is random already, and its steers name it; a client's id is not
        triton_id = rid if live is not None else triton_prefix(rid)
        async for event in self._refunded_if_refused(generation, self.pipeline.generate(generation, triton_id, attach)):
            if live is not None:
                # a step's response counts the steps done after it: that step's index is one less
                step = event.step if not isinstance(event, Finished) else (event.total_steps or 0)
                for steer_id in event.steered:
                    yield SteerApplied(event.index, steer_id, max(0, step - 1))
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

    async def _refunded_if_refused(self, generation: Generation, events: AsyncIterator) -> AsyncIterator:
        """The pipeline's events; a refusal before the first of them (invalid, queue full) is refunded."""
        ran = False
        try:
            async for event in events:
                ran = True
                yield event
        except ApiError:
            if not ran:
                self.refund(generation)
            raise

    def _owner(self, caller: str) -> str:
        """Who may steer or cancel a live generation: the key that started it; without keys,
        anyone who holds its (unguessable) id, whichever address or replica the call comes by."""
        return caller if self.access.keys is not None else ""

    async def start_live(self, generation: Generation, caller: str) -> LiveGeneration:
        """Admits a live generation (one image: its steers and its events are one image's)."""
        if generation.n != 1:
            raise invalid("n", f"a live generation makes one image; must be 1, got {generation.n}")
        await self.admit(generation, caller)
        await self.decode(generation)
        try:
            return self.live.add(LiveGeneration(new_id(self.replica), self._owner(caller)))
        except ApiError:
            self.refund(generation)
            raise

    async def live_events(self, generation: Generation, live: LiveGeneration, route: str) -> AsyncIterator:
        """`events` of a live generation; its entry leaves the live table when they end. Once
        cancelled by `cancel` they end with ApiError(CANCELLED)."""
        try:
            async for event in self.events(generation, live.id, route, live):
                live.started.set()
                yield event
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not live.cancelled or (task is not None and task.cancelling()):
                raise  # the caller went away: nothing to report to
            raise ApiError(CANCELLED, f"generation {live.id} was cancelled") from None
        finally:
            live.started.set()
            self.live.finish(live)

    async def steer(self, generation_id: str, caller: str, fields: dict) -> int:
        """Sends new conditioning to a live generation of this replica; its steer id. The order:
        the fields' names and texts, the owner, the uploads' counts and headers, then decoding."""
        unknown = [name for name in fields if name not in STEERABLE]
        if unknown:
            raise invalid(unknown[0], f"cannot be steered; a steer takes {', '.join(STEERABLE)}")
        if not fields:
            raise invalid("body", f"give at least one of {', '.join(STEERABLE)}")
        if "guidance_scale" in fields and not math.isfinite(fields["guidance_scale"]):
            raise invalid("guidance_scale", f"must be a finite number, got {fields['guidance_scale']}")
        check_texts(fields)
        live = self.live.get(generation_id, self._owner(caller))
        self.check_uploads(fields)
        live.steer_budget.take(generation_id)
        try:
            self.access.charge(caller, steer_units(fields))
        except ApiError:
            live.steer_budget.give_back()
            raise
        if images.uploads(fields):
            fields = {**fields, **await self.in_pool(images.decode_inputs, fields)}
        # a steer sent before the engine has the request would find no generation there
        await live.started.wait()
        self.live.get(generation_id, self._owner(caller))  # it may have finished meanwhile
        (target,) = live.triton_ids()
        return await self.pipeline.steer(target, fields)

    def cancel(self, generation_id: str, caller: str) -> None:
        """Cancels a live generation of this replica; its stream ends with CANCELLED."""
        live = self.live.get(generation_id, self._owner(caller))
        live.cancel()
        self.live.finish(live)


def encoded(event: Finished, generation: Generation) -> EncodedImage:
    height, width = event.image.shape[:2]
    data = images.encode(event.image, generation.output_format, generation.quality)
    return EncodedImage(
        event.index, event.seed, data, generation.output_format, height, width, event.total_s, event.first_step_s
    )


def preview_png(preview, generation: Generation) -> bytes:
    """A preview at the request's size when it gave one, else at the latent resolution it has."""
    height, width = generation.inputs.get("height"), generation.inputs.get("width")
    if height and width:
        preview = images.resized(preview, height, width)
    return images.encode(preview, "png")
