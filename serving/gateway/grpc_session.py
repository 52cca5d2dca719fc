"""The gRPC `Session` (proto/ldm/v1/images.proto): one live generation per call, steered and
cancelled by the call's later messages.

Two tasks feed one queue of events: the pipeline's events (as GenerateStream's, plus
`started` and `steered`) and the reader of the client's messages, which sends each steer in
the order received (so steer ids follow the messages) and queues its `steer_ack`. The call
ends after the image, or with the generation's error as its status. A steer that fails in an
unexpected way is acknowledged INTERNAL and the reader reads on; a reader that fails ends the
call INTERNAL (never a call that goes on deaf to its steers and cancel).
"""

import asyncio

from serving.gateway.errors import GRPC_STATUS, ApiError, invalid
from serving.gateway.generation import FIELD_NAMES
from serving.gateway.protos import images_pb2
from serving.gateway.service import EncodedImage, ImageService, ProgressEvent, SteerApplied
from serving.gateway.telemetry import unexpected

ROUTE = "grpc.Session"
_END = object()


async def session(
    service: ImageService, request_iterator, caller: str, rid: str, outcome, to_generation, to_steer, to_message
):
    """Yields the call's GenerateEvents; raises ApiError for the call's status."""
    first = await anext(aiter(request_iterator), None)
    if first is None or not first.HasField("start"):
        raise invalid("start", "the first message of a Session must be `start` (a GenerateRequest)")
    generation = to_generation(first.start)
    live = await service.start_live(generation, caller)
    queue = asyncio.Queue()  # bounded in practice: a step's events and one ack per steer message read

    async def pump():
        try:
            async for event in service.live_events(generation, live, ROUTE):
                await queue.put(event)
            await queue.put(_END)
        except ApiError as error:
            await queue.put(error)

    async def read():
        sequence = 0
        try:
            async for message in request_iterator:
                if message.HasField("cancel"):
                    service.cancel(live.id, caller)
                    return
                if not message.HasField("steer"):
                    await queue.put(
                        images_pb2.SteerAck(
                            sequence=sequence,
                            error_code="INVALID_ARGUMENT",
                            error_message="only the first message may be `start`",
                            field="start",
                        )
                    )
                    continue
                sequence += 1
                await queue.put(await acknowledged(sequence, message.steer))
        except Exception as exc:  # never end silently (steers unanswered, cancel unheard): the call ends with it
            await queue.put(unexpected(exc, rid))

    async def acknowledged(sequence: int, steer):
        """The SteerAck of one steer: its id, or the error (a steer's failure never ends the call)."""
        try:
            return images_pb2.SteerAck(
                sequence=sequence, steer_id=await service.steer(live.id, caller, to_steer(steer))
            )
        except ApiError as refused:  # (an `as` name is unbound after its block)
            error = refused.renamed(FIELD_NAMES)
        except Exception as exc:
            error = unexpected(exc, rid)
        return images_pb2.SteerAck(
            sequence=sequence,
            error_code=GRPC_STATUS[error.code].name,
            error_message=error.message,
            field=error.field or "",
        )

    tasks = [asyncio.create_task(pump()), asyncio.create_task(read())]
    started = False
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, ApiError):
                raise item
            if not started:
                started = True
                total = (
                    item.total_steps
                    if isinstance(item, ProgressEvent)
                    else generation.inputs.get("steps", service.default_steps())
                )
                yield images_pb2.GenerateEvent(
                    started=images_pb2.Started(generation_id=live.id, seed=generation.seed, total_steps=total),
                    request_id=rid,
                )
            if isinstance(item, images_pb2.SteerAck):
                yield images_pb2.GenerateEvent(steer_ack=item, request_id=rid)
            elif isinstance(item, SteerApplied):
                steered = images_pb2.Steered(index=item.index, steer_id=item.steer_id, step=item.step)
                yield images_pb2.GenerateEvent(steered=steered, request_id=rid)
            elif isinstance(item, EncodedImage):
                outcome.images += 1
                yield images_pb2.GenerateEvent(image=to_message(item), request_id=rid)
            else:
                yield images_pb2.GenerateEvent(progress=progress_message(item), request_id=rid)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def progress_message(event: ProgressEvent):
    """The Progress message of a progress event (GenerateStream and Session send the same)."""
    return images_pb2.Progress(
        index=event.index, step=event.step, total_steps=event.total_steps, preview=event.preview or b""
    )
