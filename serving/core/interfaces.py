"""The two interfaces the core calls out through, as checked Protocols: the models a Runner calls
(serving/core/runner.py; Triton BLS calls, ONNX Runtime or torch in this process:
serving/models/, serving/triton/templates/pipeline_model.py) and the sink a job's results go to
(serving/triton/templates/pipeline_model.py's TritonSink, serving/bench/, the tests' fakes).

mypy checks every implementation against these: each one's module (or test) assigns an instance,
or passes one, where the Protocol is the declared type. Imports nothing from Triton."""

from typing import Any, Protocol, TypeAlias

import numpy as np

Array: TypeAlias = np.ndarray[Any, Any]


class RunnerModels(Protocol):
    """One UNet variant's models as a Runner calls them, over numpy arrays. The UNet calls take
    the latents (`sample`), one timestep per row and the text context, and every other per-row
    input by name (SDXL's text_embeds and time_ids, regions' weights, LoRA scales and banks).
    An implementation may also have `row_cap` (the UNet rows per call its device can serve)."""

    def encode_text(self, input_ids: Array, **more_ids: Array) -> dict[str, Array]:
        """Token ids by input name (input_ids, and SDXL's input_ids_2) -> the text encoder's outputs by name."""
        ...

    def unet(self, sample: Array, timestep: Array, encoder_hidden_states: Array, **per_row: Array) -> Array:
        """The noise (or velocity) prediction of each row."""
        ...

    def regional_unet(self, sample: Array, timestep: Array, encoder_hidden_states: Array, **per_row: Array) -> Array:
        """The regional UNet (regions' attention mode): as `unet`, with region_weights."""
        ...

    def decode(self, latents: Array) -> Array:
        """Latents -> float images in [0, 1], [N, H, W, 3]."""
        ...

    def encode_image(self, images: Array) -> tuple[Array, Array]:
        """Images -> the VAE latent distribution's (mean, std)."""
        ...


class ResultSink(Protocol):
    """Receives a job's outputs, from the engine's worker thread: progress any number of times,
    then one final answer, finish or fail, once. Any method may raise (a client gone): the
    engine then ends that job alone; after a finish that raised it calls fail once, as a last
    word (the image did not reach the client; a sender closed by the raise refuses it)."""

    def progress(self, step: int, total: int, preview: Array | None, steer_applied: tuple[int, ...] = ()) -> None:
        """steer_applied: the steers (ids) first used by the step just done; the engine passes
        it only when there are some."""
        ...

    def finish(self, image: Array, seed: int) -> None:
        """The uint8 [H, W, 3] image and the seed it was drawn from."""
        ...

    def fail(self, code: str, message: str) -> None:
        """An error code (serving/core/errors.py) and its message."""
        ...

    def cancelled(self) -> bool:
        """Whether the client gave up on the job (the engine then drops it)."""
        ...
