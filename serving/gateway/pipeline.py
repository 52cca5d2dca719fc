"""The gateway's side of Triton: the `pipeline` model over tritonclient.grpc.aio streaming.

Every request, unary or streamed, REST or gRPC, is sent on a gRPC stream to the decoupled
`pipeline`, so it lands in the engine's bounded queue and joins the step-level batch. The n
images of one request travel on one stream (one Triton request each, ids `<request id>-<i>`);
leaving `generate` early (the client went away, an image failed) cancels the stream, and
Triton marks its requests cancelled, which the engine honours at its next step.

A live generation (`/v1/generations`, the gRPC Session) is steered by a separate request to
`pipeline` whose parameter `steer_request_id` names the running request's id (`steer`); the
generation's stream then reports, in the response of the step that first used it, the steer
ids in its `steer_applied` output. A steer is a control message: it carries the control secret
(serving/triton/control.py) this gateway was given.

`status` asks the engine whether it admits and how loaded it is (a status message): the
readiness watch asks it, so a drained or stopped engine makes the gateway not ready.

`loras`, `load_lora` and `unload_lora` send the pipeline's LoRA messages (serving/triton/loras.py),
control messages too: the adapters the pipeline holds, an uploaded file registered, one removed.
"""

import asyncio
from dataclasses import dataclass
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from serving.client.kserve import infer_inputs
from serving.core.errors import UNAVAILABLE
from serving.core.steering import STEER_PARAMETER
from serving.triton import loras as lora_messages
from serving.triton.control import CONTROL_PARAMETER, STATUS_PARAMETER
from serving.gateway.errors import UNIMPLEMENTED, ApiError, from_pipeline
from serving.gateway.generation import Generation, to_array

MODEL = "pipeline"


@dataclass
class PipelineProgress:
    index: int
    step: int
    total_steps: int
    preview: np.ndarray | None  # uint8 [h, w, 3] at latent resolution
    elapsed_s: float
    steered: tuple = ()  # ids of the steers first used by the step just done (step - 1)


@dataclass
class Finished:
    index: int
    image: np.ndarray  # uint8 [H, W, 3]
    seed: int
    total_s: float
    first_step_s: float | None
    steered: tuple = ()  # ids of the steers first used by the last step
    total_steps: int | None = None  # as the last progress response said


@dataclass(frozen=True)
class PipelineModel:
    """What the served pipeline declares: its inputs (name -> Triton data type) and parameters
    (the models it serves among them: serving/gateway/models.py)."""

    inputs: dict
    parameters: dict
    read_at: int = 0  # Unix seconds: when the gateway read it (the models' `created`)

    @classmethod
    def from_config(cls, config: dict, read_at: float = 0) -> "PipelineModel":
        inputs = {i["name"]: i["data_type"] for i in config.get("input", [])}
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        return cls(inputs, parameters, int(read_at))

    def parameter(self, key: str, cast, default):
        try:
            return cast(self.parameters[key])
        except (KeyError, ValueError):
            return default


@dataclass(frozen=True)
class EngineStatus:
    """A status message's answer."""

    accepting: bool
    active: int
    queued: int


class PipelineClient:
    def __init__(self, url: str, control_secret: str | None = None):
        self.url = url
        self.client = aioclient.InferenceServerClient(url)
        self.control_secret = control_secret or ""  # none: the pipeline refuses this gateway's steers
        self.model: PipelineModel | None = None  # known once Triton has answered

    async def close(self) -> None:
        await self.client.close()

    async def is_ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(MODEL, client_timeout=5))
        except InferenceServerException:
            return False

    async def status(self) -> EngineStatus:
        """The engine's status message answer; raises ApiError when Triton does not give one."""

        def answer(result):
            values = [result.as_numpy(name) for name in ("accepting", "active", "queued")]
            if any(v is None for v in values):
                return None  # a pipeline exported before status messages: it cannot say
            return EngineStatus(bool(values[0][0]), int(values[1][0]), int(values[2][0]))

        request = {
            "model_name": MODEL,
            "inputs": infer_inputs({"prompt": np.array([b""], dtype=np.object_)}),
            "parameters": {STATUS_PARAMETER: "1"},
        }
        status = await self._ask(request, answer)
        if status is None:
            raise ApiError(UNAVAILABLE, "the pipeline did not answer the status message", retry_after_s=1.0)
        return status

    async def _ask(self, request: dict, answer, refusal=None, graceful: bool = False):
        """Sends one message (status, steer, LoRA) on a stream of its own: answer(result) of the
        first response it is not None for, or None when the stream ends without one; a refusal
        is raised as ApiError (refusal(text), default from_pipeline). `graceful`: once answered,
        the stream is half-closed and read to its end rather than cancelled (LoRA messages: see
        _half_close)."""

        async def requests():
            yield request
            await answered.wait()

        answered = asyncio.Event()
        stream = self.client.stream_infer(requests())
        ended = False
        try:
            async for result, error in _responses(stream):
                if error is not None:
                    raise (refusal or from_pipeline)(str(error.message()))
                value = answer(result)
                if value is not None:
                    if graceful:
                        ended = await _half_close(stream, answered)
                    return value
            ended = True
            return None
        finally:
            answered.set()
            if not ended:
                stream.cancel()

    async def load_model(self) -> bool:
        """(Re)reads what the served pipeline declares; False when Triton did not answer."""
        try:
            response = await self.client.get_model_config(MODEL, as_json=True, client_timeout=5)
        except InferenceServerException:
            return False
        self.model = PipelineModel.from_config(response["config"], time.time())
        return True

    def require_model(self) -> PipelineModel:
        if self.model is None:
            raise ApiError(UNAVAILABLE, f"the pipeline at {self.url} is not ready yet, retry later", retry_after_s=5.0)
        return self.model

    async def generate(self, generation: Generation, request_id: str, attach=None) -> AsyncIterator:
        """PipelineProgress and Finished events until all n images are in; raises ApiError. `attach` is
        given the Triton stream once it is open (what a DELETE cancels)."""
        declared = self.require_model().inputs
        arrays = [generation.arrays(i, declared) for i in range(generation.n)]
        start = time.monotonic()
        all_in = asyncio.Event()

        async def requests():
            for index, named in enumerate(arrays):
                yield {"model_name": MODEL, "inputs": infer_inputs(named), "request_id": f"{request_id}-{index}"}
            await all_in.wait()  # the stream stays open until the last image has come back

        stream = self.client.stream_infer(requests())
        if attach is not None:
            attach(stream)
        pending = set(range(generation.n))
        first_step, totals = {}, {}
        try:
            async for result, error in _responses(stream):
                if error is not None:
                    raise generation.refused(from_pipeline(str(error.message())))
                index = int(result.get_response().id.rsplit("-", 1)[1])
                image = result.as_numpy("image")
                applied = result.as_numpy("steer_applied")
                steered = () if applied is None else tuple(int(s) for s in applied.reshape(-1))
                if image is None:
                    elapsed = time.monotonic() - start
                    first_step.setdefault(index, elapsed)
                    step, total = int(result.as_numpy("step")[0]), int(result.as_numpy("total_steps")[0])
                    totals[index] = total
                    yield PipelineProgress(index, step, total, result.as_numpy("preview"), elapsed, steered)
                    continue
                pending.discard(index)
                seed = int(result.as_numpy("seed")[0])
                yield Finished(
                    index, image, seed, time.monotonic() - start, first_step.get(index), steered, totals.get(index)
                )
                if not pending:
                    return
            raise ApiError(UNAVAILABLE, f"the pipeline's stream ended with {len(pending)} image(s) missing")
        finally:
            all_in.set()
            if pending:  # left early: cancel what is still running
                stream.cancel()

    def takes_loras(self) -> bool:
        """Whether the served pipeline takes LoRA messages (its model declares their file input)."""
        return lora_messages.FILE_INPUT in self.require_model().inputs

    async def loras(self, model: str = "") -> list:
        """[{"id", "model", "resident"}] of the adapters of `model` ("": every model's)."""
        if not self.takes_loras():
            return []
        return await self._lora_message("list", model=model)

    async def load_lora(self, name: str, data: bytes, model: str = "") -> list:
        """Registers an adapter file under `name`; the adapters of its model after it."""
        self._require_loras()
        return await self._lora_message(
            "load", name, model, {lora_messages.FILE_INPUT: np.array([data], dtype=np.object_)}
        )

    async def unload_lora(self, name: str, model: str = "") -> list:
        self._require_loras()
        return await self._lora_message("unload", name, model)

    def _require_loras(self) -> None:
        if not self.takes_loras():
            raise ApiError(
                UNIMPLEMENTED,
                "the served pipeline takes no LoRA messages (exported before LoRA adapters "
                "could be loaded at run time): re-export it (ldm serve does)",
            )

    async def _lora_message(self, action: str, name: str = "", model: str = "", inputs: dict | None = None) -> list:
        parameters = {
            lora_messages.ACTION_PARAMETER: action,
            lora_messages.NAME_PARAMETER: name,
            lora_messages.MODEL_PARAMETER: model,
            CONTROL_PARAMETER: self.control_secret,
        }
        request = {
            "model_name": MODEL,
            "parameters": parameters,
            "inputs": infer_inputs(inputs or {"prompt": np.array([b""], dtype=np.object_)}),
        }
        entries = await self._ask(
            request,
            lambda result: lora_messages.decode(result.as_numpy(lora_messages.LIST_OUTPUT)),
            lora_refusal,
            graceful=True,
        )
        if entries is None:
            raise ApiError(
                UNAVAILABLE, f"the pipeline's stream ended without answering the LoRA {action}", retry_after_s=1.0
            )
        return entries

    async def steer(self, target: str, fields: dict) -> int:
        """Sends a steer message for Triton request `target`; its steer id (1, 2, ... per
        generation). The pipeline's refusal (NOT_FOUND, FAILED_PRECONDITION, INVALID_ARG naming
        the field) is raised as ApiError."""
        declared = self.require_model().inputs
        named = {name: to_array(name, value, declared[name]) for name, value in fields.items()}

        def answer(result):
            steer_id = result.as_numpy("steer_id")
            return None if steer_id is None else int(steer_id.reshape(-1)[0])

        request = {
            "model_name": MODEL,
            "inputs": infer_inputs(named),
            "request_id": f"{target}-steer",
            "parameters": {STEER_PARAMETER: target, CONTROL_PARAMETER: self.control_secret},
        }
        steer_id = await self._ask(request, answer)
        if steer_id is None:
            raise ApiError(UNAVAILABLE, "the pipeline's stream ended without answering the steer", retry_after_s=1.0)
        return steer_id


async def _half_close(stream, answered: asyncio.Event, timeout_s: float = 5.0) -> bool:
    """Ends a message's stream by half-closing it and reading it to its end (True), instead of
    cancelling it: a LoRA load's stream cancelled straight after its answer left tritonserver
    2.51 unable to unload the pipeline at shutdown, now and then. False when it did not end in
    `timeout_s` (the caller cancels it then)."""
    answered.set()

    async def rest():
        async for _ in _responses(stream):
            pass

    try:
        await asyncio.wait_for(rest(), timeout_s)
        return True
    except (TimeoutError, ApiError):
        return False


def lora_refusal(text: str) -> ApiError:
    """The pipeline's refusal of a LoRA message; its field (name, file, model) named also where
    the code is not INVALID_ARG (an unknown adapter's NOT_FOUND)."""
    error = from_pipeline(text)
    if error.field is None and ": " in error.message:
        field, message = error.message.split(": ", 1)
        if field in ("name", "file", "model"):
            return ApiError(error.code, message, field, error.retry_after_s)
    return error


async def _responses(stream):
    """The stream's (result, error) pairs; a broken transport is UNAVAILABLE."""
    try:
        async for pair in stream:
            yield pair
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            raise asyncio.CancelledError() from None
        raise ApiError(
            UNAVAILABLE, f"lost the pipeline's stream: {exc.code().name} {exc.details()}", retry_after_s=1.0
        ) from None
