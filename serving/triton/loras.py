"""LoRA control messages of the Triton `pipeline` model: list the adapters, load one (an uploaded
file), unload one (serving/core/service.py does the work; serving/core/lora.py holds them).
Imports nothing from Triton: the model (serving/triton/templates/pipeline_model.py) adapts
tensors and its response sender, the gateway (serving/gateway/pipeline.py) sends the messages.

A LoRA message is a request to `pipeline` whose parameter ACTION_PARAMETER (`lora_action`) is
`list`, `load` or `unload`; like drain, cancel and steer it carries the control secret
(serving/triton/control.py), else it is refused PERMISSION_DENIED. Its other parameters:
NAME_PARAMETER (`lora_name`: the adapter, for load and unload) and MODEL_PARAMETER
(`lora_model`: a served model; empty: the default model, and for `list` every model). A load
carries the file's bytes in the input FILE_INPUT (`lora_file`, BYTES [1]). The answer is one
FINAL response (a load's is sent from a thread of its own, once the file is read): LIST_OUTPUT
(`loras`, BYTES [1]) holding JSON, a list of {"id", "model",
"resident"} (for a load or unload, the adapters of the model it changed, after the change), or
one error coded as the pipeline's other errors ("[CODE] message", serving/core/errors.py):

  [INVALID_ARG] name: ... / file: <why it is not a LoRA of this model, naming the first layer
                that does not fit> / model: ... takes no LoRA adapters / lora_action: ...
  [TOO_LARGE] file: N bytes; at most M bytes per adapter file   (max_lora_file_mb)
  [NOT_FOUND] name: no adapter named 'x'; loaded: ...  /  model: no model named 'x' ...
  [FAILED_PRECONDITION] 'x' is used by a running generation; retry when it has finished

The tensors FILE_INPUT and LIST_OUTPUT are declared by the model itself (CONTROL_INPUTS,
CONTROL_OUTPUTS: its auto_complete_config), so an export needs nothing more to take them.

A sender should end a LoRA message's stream by half-closing it once answered, not by cancelling
it (serving/gateway/pipeline.py does): a load's stream cancelled straight after its answer left
tritonserver 2.51 unable to unload the pipeline at shutdown in 5 of 6 runs (its model never
finalized; the server exits after its exit timeout), 0 of 16 since. The same stall still shows
now and then after other traffic, LoRA or not (a stream cancelled mid-generation, ...)."""

import json
import re

import numpy as np

from serving.core.errors import FAILED_PRECONDITION, INVALID_ARG, NOT_FOUND

ACTION_PARAMETER = "lora_action"
NAME_PARAMETER = "lora_name"
MODEL_PARAMETER = "lora_model"
FILE_INPUT = "lora_file"
LIST_OUTPUT = "loras"
ACTIONS = ("list", "load", "unload")
TOO_LARGE = "TOO_LARGE"  # the gateway's code for 413 (serving/gateway/errors.py)
# what the pipeline model adds to its config (Triton's auto-complete), as pb_utils takes them
CONTROL_INPUTS = ({"name": FILE_INPUT, "data_type": "TYPE_STRING", "dims": [1], "optional": True},)
CONTROL_OUTPUTS = ({"name": LIST_OUTPUT, "data_type": "TYPE_STRING", "dims": [1]},)
# the service reads an upload from a scratch file (`.<name>.<hex>.partial` in its upload folder):
# a refusal's message names it, and the readers' messages its full path, which are the server's own
_SCRATCH_PATH = re.compile(r"""(?:'[^']*|"[^"]*|\S*)/\.[^/\s'"]+\.[0-9a-f]{8}\.partial['"]?""")
_SCRATCH_NAME = re.compile(r"\.[^/\s'\"]+\.[0-9a-f]{8}\.partial")


class LoraMessageError(Exception):
    """A LoRA message refused: its code (serving/core/errors.py, or TOO_LARGE) and message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def action_of(parameters: dict) -> str | None:
    """The LoRA action a request's parameters name, or None for any other request."""
    action = parameters.get(ACTION_PARAMETER)
    return None if action is None else str(action)


def answer(service, parameters: dict, inputs: dict) -> list:
    """The list a LoRA message answers with, after doing what it asks; LoraMessageError."""
    from serving.core.request import InvalidInput
    from serving.core.service import LoraInUse, LoraTooLarge, UnknownModel

    action = action_of(parameters)
    name, model = str(parameters.get(NAME_PARAMETER, "")), str(parameters.get(MODEL_PARAMETER, ""))
    try:
        if action not in ACTIONS:
            raise InvalidInput(ACTION_PARAMETER, f"must be one of {', '.join(ACTIONS)}, got {action!r}")
        if action == "list":
            if model:
                service.model_of({"model": np.array([model.encode()], object)})  # NOT_FOUND for an unknown model
            return service.loras(model)
        if not name:
            raise InvalidInput("name", "is required")
        served = service.model_of({"model": np.array([model.encode()], object)} if model else {})
        if action == "load":
            data = file_bytes(inputs)
            # refused before the service writes the file: its load_lora replaces an adapter's file
            # before it finds the adapter held (a refused replace would then apply once evicted)
            if served.lora is not None and served.lora.holds.get(name):
                raise LoraInUse(f"{name!r} is used by a running generation; retry when it has finished")
            service.load_lora(name, data, model)
        else:
            service.unload_lora(name, model)
        return service.loras(served.name)
    except InvalidInput as exc:
        raise LoraMessageError(INVALID_ARG, _without_scratch(str(exc), name)) from None
    except LoraTooLarge as exc:
        raise LoraMessageError(TOO_LARGE, str(exc)) from None
    except LoraInUse as exc:
        raise LoraMessageError(FAILED_PRECONDITION, str(exc)) from None
    except UnknownModel as exc:
        raise LoraMessageError(NOT_FOUND, str(exc)) from None


def _without_scratch(message: str, name: str) -> str:
    """A refusal's message with the server's scratch file named as the upload."""
    return _SCRATCH_NAME.sub(f"{name}.safetensors", _SCRATCH_PATH.sub("the uploaded file", message))


def warm_reader() -> None:
    """Imports what reading an adapter file imports (serving/models/adapters.py: torch,
    diffusers, transformers, peft), for the pipeline model's initialize to call when it serves
    LoRA: the first request naming an adapter is read on the engine's thread, which would
    otherwise stall every running generation for those seconds of imports (5-20 s on 2 cores)."""
    import accelerate  # noqa: F401
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from peft.tuners.lora import LoraLayer  # noqa: F401
    import torch  # noqa: F401
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: F401

    import families.lora  # noqa: F401


def file_bytes(inputs: dict) -> bytes:
    from serving.core.request import InvalidInput

    value = inputs.get(FILE_INPUT)
    array = None if value is None else np.asarray(value, dtype=object).reshape(-1)
    if array is None or array.size != 1 or not isinstance(array[0], (bytes, bytearray)):
        raise InvalidInput("file", f"a load carries the adapter file's bytes in {FILE_INPUT} (BYTES [1])")
    return bytes(array[0])


def encode(entries: list) -> np.ndarray:
    """LIST_OUTPUT's tensor."""
    return np.array([json.dumps(entries).encode()], dtype=object)


def decode(tensor) -> list | None:
    """The list a LIST_OUTPUT tensor holds (None: no such tensor)."""
    if tensor is None:
        return None
    raw = np.asarray(tensor, dtype=object).reshape(-1)[0]
    return json.loads(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
