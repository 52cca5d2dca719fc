"""One generation request in flight, and where its results go. Imports nothing from Triton."""
from dataclasses import dataclass, field
import time
from typing import Protocol

import numpy as np

from serving.core.request import GenerationRequest

# error codes, as Triton's TritonError names them
INVALID_ARG = "INVALID_ARG"
UNAVAILABLE = "UNAVAILABLE"
CANCELLED = "CANCELLED"
INTERNAL = "INTERNAL"


def coded_message(code: str, message: str) -> str:
    """Error text that carries its code: gRPC stream errors and BLS replies lose the status code,
    so clients and the unary front read it back from the message."""
    return f"[{code}] {message}"


def parse_coded_message(text: str) -> tuple:
    """(code, message) from `coded_message` text; code is None for other text."""
    if text.startswith("[") and "] " in text:
        code, message = text[1:].split("] ", 1)
        if code.isupper():
            return code, message
    return None, text


class ResultSink(Protocol):
    """Receives a job's outputs; exactly one of finish/fail is called, once."""

    def progress(self, step: int, total: int, preview: np.ndarray | None) -> None: ...

    def finish(self, image: np.ndarray, seed: int) -> None: ...

    def fail(self, code: str, message: str) -> None: ...

    def cancelled(self) -> bool: ...


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    sink: ResultSink
    arrival: float = field(default_factory=time.monotonic)
    # filled in on admission
    rng: np.random.Generator | None = None
    latents: np.ndarray | None = None  # float32 [C, h, w]
    timesteps: np.ndarray | None = None
    cond: np.ndarray | None = None  # text embedding [L, D]
    uncond: np.ndarray | None = None  # negative-prompt embedding, only with guidance
    index: int = 0  # denoising steps done
    last_stepped: int = -1  # engine iteration of the last step (fairness)
    pred_x0: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return 2 if self.request.uses_guidance else 1

    @property
    def latent_shape(self) -> tuple:
        return self.latents.shape

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def deadline(self) -> float | None:
        return self.arrival + self.request.timeout_s if self.request.timeout_s > 0 else None
