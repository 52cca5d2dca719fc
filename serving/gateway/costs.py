"""What a request costs its caller's token bucket: work, not calls (docs/security.md).

One work unit is one image of the served pipeline's default request: `default_steps` steps at
its native size with guidance (2 UNet rows). An image costs steps x pixels x rows in those units,
rows being (1 + regions) x 2 with guidance (> 1) and 1 + regions without (latent mode's count;
attention mode is charged the same), and at least MIN_IMAGE_UNITS (each call has its overhead).
So `--rate-limit 2` lets a key make two default images per second, or one of twice the steps.
The native size is the requested model's (the pipeline's config parameter `models`; an image
of an SDXL model at 1024x1024 costs what an SD 1.5 image at 512x512 does: the work a step of each
does at its own native size is not known to the gateway); a pipeline exported before several
models has the one `native_size`, and one exported before that is charged as if each request
were at its native size.

A steer re-encodes the texts it gives (a schedule's every distinct text) under the engine's lock
and a mask steer runs the VAE encoder: STEER_UNITS, MASK_STEER_UNITS. Each live generation also
takes at most MAX_STEERS steers, at most STEERS_PER_S per second in bursts of STEER_BURST
(`SteerBudget`)."""

from dataclasses import dataclass, field
import time

from serving.gateway.errors import RESOURCE_EXHAUSTED, ApiError
from serving.gateway.models import find, served_models

MIN_IMAGE_UNITS = 0.1
STEER_UNITS = 0.25
MASK_STEER_UNITS = 1.0
MAX_STEERS = 256
STEERS_PER_S = 4.0
STEER_BURST = 8.0


def image_units(generation, model) -> float:
    """Work units of one image of `generation` on the pipeline `model` declares."""
    inputs = generation.inputs
    default_steps = model.parameter("default_steps", int, 25)
    steps = inputs.get("steps") or default_steps
    native = model.parameter("native_size", int, 0)
    if "models" in model.parameters:  # the requested model's (an unknown one was refused before)
        native = find(served_models(model), inputs.get("model") or "").native_size or native
    height, width = inputs.get("height"), inputs.get("width")
    pixels = (height * width) / native**2 if native and height and width else 1.0
    guidance = inputs.get("guidance_scale", model.parameter("default_guidance_scale", float, 5.0))
    rows = (1 + len(inputs.get("region_prompts") or ())) * (2 if guidance > 1.0 else 1)
    return max(MIN_IMAGE_UNITS, (steps / default_steps) * pixels * (rows / 2))


def work_units(generation, model) -> float:
    return generation.n * image_units(generation, model)


def steer_units(fields: dict) -> float:
    return MASK_STEER_UNITS if fields.get("mask") is not None else STEER_UNITS


@dataclass
class SteerBudget:
    """One live generation's steers: MAX_STEERS in all, STEERS_PER_S (burst STEER_BURST)."""

    used: int = 0
    tokens: float = STEER_BURST
    at: float = field(default_factory=time.monotonic)

    def take(self, generation_id: str, now: float | None = None) -> None:
        """Counts one steer; RESOURCE_EXHAUSTED (with the wait) past either bound."""
        now = time.monotonic() if now is None else now
        if self.used >= MAX_STEERS:
            raise ApiError(
                RESOURCE_EXHAUSTED,
                f"generation {generation_id} has had its {MAX_STEERS} steers; start a new one",
                retry_after_s=60.0,
            )
        self.tokens = min(STEER_BURST, self.tokens + (now - self.at) * STEERS_PER_S)
        self.at = now
        if self.tokens < 1:
            wait = (1 - self.tokens) / STEERS_PER_S
            raise ApiError(
                RESOURCE_EXHAUSTED,
                f"generation {generation_id} takes at most {STEERS_PER_S:g} steers per "
                f"second (bursts of {STEER_BURST:g}); retry in {wait:.2f} s",
                retry_after_s=wait,
            )
        self.tokens -= 1
        self.used += 1

    def give_back(self) -> None:
        """Undoes the last `take` (the steer was refused before it was sent)."""
        self.tokens = min(STEER_BURST, self.tokens + 1)
        self.used -= 1
