"""Python client of the service (tritonclient underneath).

gRPC (default) streams from the decoupled `pipeline` model, which also gives progress and
previews; HTTP, or gRPC with unary=True, calls the request/response `pipeline_unary` model.
Errors raise tritonclient's InferenceServerException whose status() is the error code
(INVALID_ARG, UNAVAILABLE, CANCELLED, NOT_FOUND, FAILED_PRECONDITION, ...).

Steering (gRPC): run a generation with a `request_id`, and call `steer(request_id, prompt=...)`
from any thread (or another client of the same server) while it streams; `GenerationResult.steered`
lists which step first used each steer.
"""

from dataclasses import dataclass, field
import queue
from typing import Any
import threading

import numpy as np
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from serving.client.loras import lora_pairs
from serving.core.errors import parse_coded_message
from serving.core.request import FIELDS
from serving.core.steering import STEER_PARAMETER
from serving.triton.control import CONTROL_PARAMETER

STREAM_MODEL, UNARY_MODEL = "pipeline", "pipeline_unary"


@dataclass
class GenerationResult:
    image: np.ndarray  # uint8 [H, W, 3]
    seed: int
    progress: list = field(default_factory=list)  # (step, total_steps) per progress response
    previews: list = field(default_factory=list)  # uint8 images
    steered: list = field(default_factory=list)  # (steer id, 0-based index of the first step that used it)


def infer_inputs(arrays: dict, module=None) -> list:
    """tritonclient InferInputs (of `module`: tritonclient.grpc by default, or tritonclient.http)
    holding the named arrays."""
    if module is None:
        import tritonclient.grpc

        module = tritonclient.grpc
    inputs = []
    for name, value in arrays.items():
        tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def request_arrays(prompt, loras=None, **fields) -> dict:
    """The pipeline's input tensors for `prompt` and the given fields (serving.core.request.FIELDS
    names them); fields left out or None take the server's defaults. A field of shape [1] takes a
    value; a list field (region_prompts) a list of texts; `model` a served model's name (absent:
    the server's default model). A field of fixed shape (guidance_interval FP32 [2], SDXL's
    original_size, crop_top_left, target_size INT32 [2]) also takes a list or tuple of numbers,
    converted to its type. Arrays (`init_image` uint8 [H, W, 3], `mask` uint8 [H, W],
    `region_masks` uint8 [R, H, W], or a fixed-shape field as an ndarray) are sent as given, never
    cast: an array of another dtype or rank raises INVALID_ARG naming the field, as the server
    would answer. `loras` ([(name, weight)], {name, weight} dicts or "NAME:WEIGHT" texts,
    serving/client/loras.py) gives `lora_names` and `lora_weights` (also given as a list of
    names and a list of numbers)."""
    specs = {f.name: f for f in FIELDS}
    if loras:
        if fields.get("lora_names") is not None or fields.get("lora_weights") is not None:
            raise TypeError("give loras, or lora_names and lora_weights, not both")
        pairs = lora_pairs(loras)
        fields = {**fields, "lora_names": [n for n, _ in pairs], "lora_weights": [w for _, w in pairs]}
    if isinstance(fields.get("lora_weights"), (list, tuple)):  # FP32 [N]: numbers as float32
        fields = {**fields, "lora_weights": np.asarray(fields["lora_weights"], dtype=np.float32)}
    unknown = sorted(set(fields) - set(specs))
    if unknown:
        raise TypeError(f"unknown request fields {unknown}; known: {sorted(specs)}")
    arrays = {}
    for name, value in {"prompt": prompt, **fields}.items():
        if value is None:
            continue
        spec = specs[name]
        if spec.dtype == "bytes":
            values = value if spec.dims != (1,) else [value]
            value = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in values], dtype=np.object_)
        elif spec.dims != (1,):
            if (
                isinstance(value, (list, tuple))
                and -1 not in spec.dims
                and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value)
            ):
                value = _fixed_shape(name, value, spec)
            value = np.asarray(value)
            if (
                value.dtype != np.dtype(spec.dtype)
                or value.ndim != len(spec.dims)
                or any(d != -1 and d != n for d, n in zip(spec.dims, value.shape))
            ):
                shape = ", ".join("N" if d == -1 else str(d) for d in spec.dims)
                raise InferenceServerException(
                    f"{name}: must be {np_to_triton_dtype(np.dtype(spec.dtype))} [{shape}], got {value.dtype} {list(value.shape)}",
                    status="INVALID_ARG",
                )
        else:
            value = np.array([value], dtype=spec.dtype)
        arrays[name] = value
    return arrays


def _fixed_shape(name: str, values, spec) -> np.ndarray:
    """A list of numbers as the field's type: integers for an integer field, without wrapping."""
    dtype = np.dtype(spec.dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not all(float(v).is_integer() and info.min <= v <= info.max for v in values):
            raise InferenceServerException(
                f"{name}: must be {np_to_triton_dtype(dtype)} integers, got {list(values)}", status="INVALID_ARG"
            )
    return np.array(values, dtype=dtype)


class LdmClient:
    def __init__(
        self,
        url: str,
        protocol: str = "grpc",
        unary: bool = False,
        timeout_s: float = 600.0,
        channel_args=None,
        control_secret: str | None = None,
    ):
        """channel_args (gRPC only): grpc channel options, e.g. a round-robin service config;
        they replace tritonclient's defaults, so repeat its message-size limits. control_secret:
        the server's (serving/triton/control.py), which `steer` needs: Triton's port is the
        operator's; clients steer through the gateway."""
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
        self.protocol = protocol
        self.url, self.channel_args = url, channel_args
        self.unary = unary or protocol == "http"
        self.timeout_s = timeout_s
        self.control_secret = control_secret or ""
        self._steerer: tuple[Any, queue.Queue] | None = (
            None  # (client, its stream's responses), opened by the first steer
        )
        self._steer_lock = threading.Lock()
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self.module = module
        if protocol == "http":
            self.client = module.InferenceServerClient(url, network_timeout=timeout_s)
        else:
            self.client = module.InferenceServerClient(url, channel_args=channel_args)

    def close(self) -> None:
        self.client.close()
        if self._steerer is not None:
            self._steerer[0].stop_stream()
            self._steerer[0].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompt, **fields) -> np.ndarray:
        """uint8 [H, W, 3] image for `prompt`; see request_arrays for the fields."""
        return self.run(prompt, **fields).image

    def run(self, prompt, on_progress=None, request_id=None, **fields) -> GenerationResult:
        """request_id (streaming only): the id `steer` names this generation by."""
        arrays = request_arrays(prompt, **fields)
        if self.unary:
            for f in FIELDS:
                if f.streaming_only:
                    arrays.pop(f.name, None)
            try:
                result = self.client.infer(UNARY_MODEL, self._inputs(arrays), outputs=self._outputs(("image", "seed")))
            except InferenceServerException as exc:
                code, message = parse_coded_message(str(exc.message()))
                raise InferenceServerException(message, status=code or exc.status()) from None
            return GenerationResult(result.as_numpy("image"), int(result.as_numpy("seed")[0]))
        return self._stream(arrays, on_progress, request_id or "")

    def steer(self, generation_id: str, prompt=None, **fields) -> int:
        """Steers the running generation sent with request_id=`generation_id` (by any client of
        this server) with any of prompt, negative_prompt, guidance_scale, region fields (they
        replace its regions) and an inpainting generation's mask, spelled as for `generate`;
        returns the steer id (1, 2, ... per generation). Raises InferenceServerException with
        status NOT_FOUND, FAILED_PRECONDITION, INVALID_ARG or PERMISSION_DENIED (no control
        secret). Steers go over one stream of a
        second connection, one at a time."""
        arrays = request_arrays(prompt, **fields)
        with self._steer_lock:
            client, responses = self.open_steering()
            client.async_stream_infer(
                STREAM_MODEL,
                self._inputs(arrays),
                parameters={STEER_PARAMETER: generation_id, CONTROL_PARAMETER: self.control_secret},
            )
            try:
                result, error = responses.get(timeout=self.timeout_s)
            except queue.Empty:
                raise InferenceServerException(
                    f"no steer answer within {self.timeout_s} s", status="DEADLINE_EXCEEDED"
                ) from None
        if error is not None:
            code, message = parse_coded_message(str(error.message()))
            raise InferenceServerException(message, status=code or error.status())
        return int(result.as_numpy("steer_id")[0])

    def open_steering(self) -> tuple:
        """Opens the steering connection and stream now (the first steer does otherwise);
        returns (client, its responses)."""
        if self.protocol != "grpc":
            raise ValueError("steering needs gRPC streaming (the decoupled pipeline model)")
        if self._steerer is None:
            client = self.module.InferenceServerClient(self.url, channel_args=self.channel_args)
            responses = queue.Queue()
            client.start_stream(callback=lambda result, error: responses.put((result, error)))
            self._steerer = (client, responses)
        return self._steerer

    def _inputs(self, arrays):
        return infer_inputs(arrays, self.module)

    def _outputs(self, names):
        return [self.module.InferRequestedOutput(n) for n in names]

    def _stream(self, arrays, on_progress, request_id="") -> GenerationResult:
        responses = queue.Queue()
        self.client.start_stream(callback=lambda result, error: responses.put((result, error)))
        generation = GenerationResult(None, 0)  # type: ignore[arg-type]  # the final response fills it
        try:
            try:
                self.client.async_stream_infer(STREAM_MODEL, self._inputs(arrays), request_id=request_id)
            except InferenceServerException:
                # The stream's transport failed before the request left (a replica died as the
                # stream opened): tritonclient raises a status-less error here and hands the
                # real one to the callback. Raise that one; without it, UNAVAILABLE.
                try:
                    _, error = responses.get(timeout=1.0)
                except queue.Empty:
                    error = None
                status = (error.status() if error is not None else None) or "UNAVAILABLE"
                raise InferenceServerException(
                    f"stream broke before the request was sent: {error.message() if error else 'no detail'}",
                    status=str(status).removeprefix("StatusCode."),
                ) from None
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise InferenceServerException(
                        f"no response within {self.timeout_s} s", status="DEADLINE_EXCEEDED"
                    ) from None
                if error is not None:
                    code, message = parse_coded_message(str(error.message()))
                    raise InferenceServerException(message, status=code or error.status())
                image = result.as_numpy("image")
                if image is not None:
                    generation.image, generation.seed = image, int(result.as_numpy("seed")[0])
                    return generation
                step, total = result.as_numpy("step"), result.as_numpy("total_steps")
                if step is not None:
                    generation.progress.append((int(step[0]), int(total[0])))
                applied = result.as_numpy("steer_applied")
                if applied is not None:
                    generation.steered.extend((int(i), int(step[0]) - 1) for i in applied)
                preview = result.as_numpy("preview")
                if preview is not None:
                    generation.previews.append(preview)
                if on_progress is not None:
                    on_progress(generation)
        finally:
            # cancels the request server-side if we leave early (error, Ctrl-C)
            self.client.stop_stream(cancel_requests=generation.image is None)
