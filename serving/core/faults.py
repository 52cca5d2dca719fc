"""Test hook: faults injected into a served pipeline, to show that each failure touches only the
requests it belongs to (tests/server/test_faults.py). Off unless the pipeline's process has the
environment variable LDM_FAULTS set when the model loads, e.g.

    LDM_FAULTS="unet_raise_at_call=3,vae_raise_at_call=2,finish_raise_at_call=3"

Each fault fires once, on the N-th call (counted from 1 over every UNet variant of the pipeline):
  text_raise_at_call=N    the text encoder raises
  unet_raise_at_call=N    the UNet (plain or regional) raises
  vae_raise_at_call=N     the VAE decoder raises
  finish_raise_at_call=N  a job's sink.finish raises before delivering (a client whose stream
                          broke at the last step)
Never set in production: it exists to be tested against.
"""

from typing import TYPE_CHECKING
import threading

from serving.core.interfaces import Array, ResultSink, RunnerModels

FAULTS_ENV = "LDM_FAULTS"
KINDS = ("text", "unet", "vae", "finish")


class InjectedFault(RuntimeError):
    pass


class FaultPlan:
    def __init__(self, spec: str):
        """spec: comma-separated `<kind>_raise_at_call=N` (see the module's docstring)."""
        self.at = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, _, value = item.partition("=")
            kind = key.removesuffix("_raise_at_call")
            if kind not in KINDS or not key.endswith("_raise_at_call") or not value.isdigit() or int(value) < 1:
                raise ValueError(f"{FAULTS_ENV}: {item!r} is not <kind>_raise_at_call=N with kind in {KINDS}, N >= 1")
            self.at[kind] = int(value)
        self.calls = dict.fromkeys(KINDS, 0)
        self.fired: list[tuple[str, int]] = []  # (kind, call) in order
        self._lock = threading.Lock()

    def tick(self, kind: str) -> None:
        """Counts one call of `kind`; raises InjectedFault on the planned one."""
        with self._lock:
            self.calls[kind] += 1
            call = self.calls[kind]
            if self.at.get(kind) != call:
                return
            self.fired.append((kind, call))
        print(f"{FAULTS_ENV}: injecting {kind} fault at call {call}", flush=True)
        raise InjectedFault(f"injected fault: {kind} call {call}")

    def models(self, models: RunnerModels) -> "FaultyModels":
        return FaultyModels(models, self)

    def sink(self, sink: ResultSink) -> ResultSink:
        return FaultySink(sink, self) if "finish" in self.at else sink


class FaultyModels:
    """A runner's models object (serving/core/runner.py) whose calls tick the plan first."""

    def __init__(self, models: RunnerModels, plan: FaultPlan):
        self.inner, self.plan = models, plan
        self.row_cap: int | None = getattr(models, "row_cap", None)

    def encode_text(self, input_ids: Array, **more_ids: Array) -> dict[str, Array]:
        self.plan.tick("text")
        return self.inner.encode_text(input_ids, **more_ids)

    def unet(self, sample: Array, timestep: Array, encoder_hidden_states: Array, **per_row: Array) -> Array:
        self.plan.tick("unet")
        return self.inner.unet(sample, timestep, encoder_hidden_states, **per_row)

    def regional_unet(self, sample: Array, timestep: Array, encoder_hidden_states: Array, **per_row: Array) -> Array:
        self.plan.tick("unet")
        return self.inner.regional_unet(sample, timestep, encoder_hidden_states, **per_row)

    def decode(self, latents: Array) -> Array:
        self.plan.tick("vae")
        return self.inner.decode(latents)

    def encode_image(self, images: Array) -> tuple[Array, Array]:
        return self.inner.encode_image(images)


class FaultySink:
    def __init__(self, sink: ResultSink, plan: FaultPlan):
        self.inner, self.plan = sink, plan

    def progress(self, step: int, total: int, preview: Array | None, steer_applied: tuple[int, ...] = ()) -> None:
        self.inner.progress(step, total, preview, steer_applied)

    def finish(self, image: Array, seed: int) -> None:
        self.plan.tick("finish")
        self.inner.finish(image, seed)

    def fail(self, code: str, message: str) -> None:
        self.inner.fail(code, message)

    def cancelled(self) -> bool:
        return self.inner.cancelled()


if TYPE_CHECKING:  # mypy checks the implementations against the core's Protocols (serving/core/interfaces.py)
    _checked: tuple[type[RunnerModels], type[ResultSink]] = (FaultyModels, FaultySink)
