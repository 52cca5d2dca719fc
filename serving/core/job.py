"""One generation request in flight, and where its results go (a ResultSink:
serving/core/interfaces.py). Imports nothing from Triton."""

from typing import Any
from dataclasses import dataclass, field
import time

import numpy as np

from serving.core.interfaces import Array, ResultSink
from serving.core.request import GenerationRequest
from serving.core.steering import prompt_spec


@dataclass(eq=False)
class Job:
    request: GenerationRequest  # a steer replaces it with the steered values
    sink: ResultSink
    request_id: str | None = None  # what steers name it by (the Triton request id); None: not steerable
    arrival: float = field(default_factory=time.monotonic)
    model: str = ""  # which served model runs it (the pipeline's default when empty)
    variant: str = "base"  # which UNet variant of its model (channel layout: base, inpaint, upscale) runs it
    # filled in on admission
    rng: np.random.Generator | None = None
    latents: Array | None = None  # float32 [C, h, w]
    timesteps: Array | None = None  # the UNet timesteps of the steps it runs
    sampler_run: Any = None  # serving.core.samplers.SamplerRun: its own schedule and solver state
    plan: Any = None  # serving.core.steering.ConditioningPlan: the conditioning of each step
    planned: GenerationRequest | None = None  # the request `plan` was made from, under the engine's lock
    conditioning: Any = None  # the plan's conditioning of the next step (rows, contexts, combine)
    image_conditioning: Any = None  # serving.core.image_jobs: extra UNet channels, latent blend, paste-back
    row_inputs: dict[str, Any] = field(default_factory=dict)  # its family's per-row denoiser inputs (SDXL's time_ids)
    held_loras: tuple[Any, ...] = ()  # the LoRA adapters it holds resident from admission to its end
    # a baseline of servers that cannot mix adapters (config lora_batching=per_set, `ldm bench
    # --loras`): only jobs with the same adapter set share a call
    lora_per_set: bool = False
    index: int = 0  # denoising steps done
    last_turn: int = -1  # the scheduler's turn when admitted or last stepped (fairness)
    pred_x0: Array | None = None
    answered: bool = False  # its final answer (finish or fail) was given: nothing follows
    steers: int = 0  # steers accepted (the last steer id)
    pending_steers: list[Any] = field(default_factory=list)  # ids accepted since the last plan

    @property
    def rows(self) -> int:
        """UNet rows this job adds to its next call (all in the same call): a steer that turns
        guidance on or off changes them from the step it applies."""
        rows: int = (self.conditioning or prompt_spec(self.request)).rows
        return rows

    def denoiser_inputs(self) -> dict[str, Any]:
        """Input name -> the value each of its rows gets: its family's, its image conditioning's."""
        if self.image_conditioning is None:
            return self.row_inputs
        return {**self.row_inputs, **self.image_conditioning.row_inputs}

    @property
    def latent_shape(self) -> tuple[Any, ...]:
        assert self.latents is not None, "admitted jobs only"
        return self.latents.shape

    @property
    def network(self) -> str:
        """Which network of its variant its rows go to: "base", or "regional/K" for regions in
        attention mode (the regional UNet, K contexts per row); a steer of its regions changes
        it from the step it applies, as `rows`."""
        network: str = (self.conditioning or prompt_spec(self.request)).network
        return network

    @property
    def call_key(self) -> tuple[Any, ...]:
        """Jobs share a UNet call only when their rows fit one input tensor of one network."""
        return (
            self.model,
            self.variant,
            self.network,
            self.latent_shape,
            self.held_loras if self.lora_per_set else None,
        )

    @property
    def done(self) -> bool:
        assert self.timesteps is not None, "admitted jobs only"
        return self.index >= len(self.timesteps)

    @property
    def deadline(self) -> float | None:
        return self.arrival + self.request.timeout_s if self.request.timeout_s > 0 else None
