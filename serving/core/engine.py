"""The generation loop: a worker thread that admits, steps and finishes jobs.

`submit` only enqueues (it is what a decoupled Triton model's `execute` calls); the worker
thread runs iterations of: drop cancelled or expired jobs, admit and text-encode new ones,
one UNet call for the jobs the scheduler picked, report progress, decode and answer finished
jobs. Every submitted job ends in exactly one final answer (finish or fail), given once.

Only the worker thread answers accepted jobs (`submit` answers nothing: a refused job raises),
so no answer can race another. A failure touches the jobs it belongs to alone: a model call
that raises fails the jobs of that call; a sink that raises (client gone) ends its own job.

`steer` (also called from Triton's thread) changes a queued or running job's prompt, negative
prompt, guidance scale, regions, inpainting mask or LoRA adapters (serving/core/steering.py
`STEERABLE`); the next iteration's admission batch encodes the new texts (and a new mask's
masked image) together with the new jobs' and installs them from the job's next step.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
import threading
import time
import traceback
from typing import Any

from serving.core.errors import CANCELLED, INTERNAL, UNAVAILABLE, ResourceExhausted
from serving.core.job import Job
from serving.core.request import InvalidInput
from serving.core.runner import Runner, guided_conditioning
from serving.core.scheduler import QueueFull, StepScheduler
from serving.core.variants import VariantRunners
from serving.core.steering import GenerationRegistry, plan_pending_steers

SHUTTING_DOWN = "server is shutting down"


class ShuttingDown(QueueFull):
    """Raised by `submit` once the engine drains or stops: the client should try elsewhere."""


@dataclass
class EngineStats:
    """Counters and gauges the serving layer exports as metrics."""

    queued: int = 0
    active: int = 0
    completed: int = 0
    cancelled: int = 0
    expired: int = 0
    rejected: int = 0
    failed: int = 0
    steers: int = 0  # steers accepted
    steps: int = 0
    rows: int = 0  # UNet rows over all steps
    rows_saved: int = 0  # unconditional rows left out of calls by guidance intervals
    step_seconds: float = 0.0  # time in UNet steps (model call and sampler updates)
    last_rows: int = 0
    last_step_seconds: float = 0.0
    row_cap: int = 0  # UNet rows per call the scheduler may use

    def on_step(self, rows: int, seconds: float) -> None:
        self.last_rows, self.last_step_seconds = rows, seconds
        self.steps += 1
        self.rows += rows
        self.step_seconds += seconds


class Engine:
    def __init__(self, runner: Runner | VariantRunners, scheduler: StepScheduler, preview: Any = None) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.preview = preview  # callable(pred_x0 [C,h,w], model name) -> uint8 image or None; or None
        self.active: list[Any] = []
        self.stats = EngineStats()
        self.registry = GenerationRegistry()  # jobs by request id, for steers
        self._lock = threading.Condition()
        self._accepting = True
        self._drain_until: float | None = None  # time.monotonic() when the drain's grace ends; None: not draining
        self._thread = threading.Thread(target=self._loop, name="ldm-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def accepting(self) -> bool:
        return self._accepting

    def submit(self, job: Job) -> None:
        """Queues a job; raises QueueFull when the admission queue is at its bound, ShuttingDown
        once `stop` was called, InvalidInput when its request id names a job queued or running
        (steers and cancels find a job by its id: a second one must not take it over). A job
        that raised was not taken: its caller answers it."""
        with self._lock:
            if not self._accepting:
                raise ShuttingDown(SHUTTING_DOWN)
            if job.request_id and job.request_id in self.registry.running:
                raise InvalidInput(
                    "request_id",
                    f"{job.request_id!r} names a generation already queued or running; request ids must be unique",
                )
            try:
                self.scheduler.enqueue(job)
            except QueueFull:
                self.stats.rejected += 1
                raise
            self.registry.add(job)
            self.stats.queued = len(self.scheduler.waiting)
            self._lock.notify()

    def steer(self, request_id: str, steer: Callable[[Any], Any], check: Callable[[Job, Any], None]) -> int:
        """Accepts a steer of the queued or running job named `request_id`: its request becomes
        `steer(request)` (serving/core/steering.py `parse_steer`) at once, so a later steer
        builds on it; `steer` and `check(job, steered_request)` validate it (raise InvalidInput).
        Returns the steer id (1, 2, ... per job). Raises SteerRefused (NOT_FOUND,
        FAILED_PRECONDITION)."""
        with self._lock:
            job = self.registry.find(request_id)
            steered = steer(job.request)
            check(job, steered)
            job.request = steered
            job.steers += 1
            job.pending_steers.append(job.steers)
            self.stats.steers += 1
            self._lock.notify()
            steers: int = job.steers
            return steers

    def stop(self, grace_s: float = 0.0, join_timeout_s: float = 10.0) -> bool:
        """Drains, then stops the worker. At once `submit` raises ShuttingDown (the caller
        answers UNAVAILABLE "server is shutting down"); at the worker's next iteration the jobs
        still waiting for admission fail with UNAVAILABLE (they have not started: the client retries elsewhere at no cost).
        The jobs in flight keep stepping until they finish or `grace_s` seconds pass; those
        left then fail with UNAVAILABLE. Every job gets exactly one final answer, all from the
        worker thread (a finish never follows a fail).

        Blocks until the worker has answered everything, or `grace_s + join_timeout_s` passed
        (a model call that hangs); returns whether the worker ended. When it has not, it
        answers the jobs left when its call returns. An engine never started drains in the
        calling thread. Calling stop again shortens nothing and returns the same way."""
        with self._lock:
            if self._accepting:
                self._accepting = False
                self._drain_until = time.monotonic() + max(0.0, grace_s)
            self._lock.notify()
        if self._thread.ident is None:  # never started: drain here
            self._drain()
            return True
        self._thread.join(max(0.0, grace_s) + join_timeout_s)
        return not self._thread.is_alive()

    def run_iteration(self) -> bool:
        """One iteration of the loop; False when there was nothing to do."""
        with self._lock:
            self._drop_ended_waiting()
            admitted = self.scheduler.admit(self.active) if self._accepting else []
            steered = [j for j in self.active if j.pending_steers]
            for job in (*admitted, *steered):
                plan_pending_steers(job)
            self.active.extend(admitted)  # held by the engine from here: `stop` sees them
            self.stats.queued = len(self.scheduler.waiting)
        self._drop_ended_active()
        admitted = [j for j in admitted if not j.answered]
        steered = [j for j in steered if not j.answered]
        if admitted or steered:
            try:
                self.runner.admit(admitted, steered)
            except Exception as exc:  # a failed text-encoder (or VAE-encoder) call fails these jobs, not the server
                traceback.print_exc()
                steering = set(map(id, steered))

                def fail(job: Job, exc: Exception = exc) -> None:
                    self._fail_by_model(
                        job, "text encoding of a steer failed" if id(job) in steering else "text encoding failed", exc
                    )

                self._retire(admitted + steered, fail)
        for job in self.active:  # the conditioning of each job's next step (a switch is an assignment)
            job.conditioning = guided_conditioning(job)
        self.stats.active = len(self.active)
        chosen = self.scheduler.pick(self.active)
        if not chosen:
            return bool(admitted)
        saved = sum(j.plan.conditioning_at(j.index).rows - j.rows for j in chosen)
        started = time.perf_counter()
        try:
            self.runner.step(chosen)
        except Exception as exc:
            traceback.print_exc()
            self._retire(chosen, partial(self._fail_by_model, what="denoising step failed", exc=exc))
            return True
        self.stats.on_step(sum(j.rows for j in chosen), time.perf_counter() - started)
        self.stats.rows_saved += saved
        self._report_progress(chosen)
        finished = [j for j in chosen if j.done and not j.answered]
        if finished:
            self._finish(finished)
        return True

    def _finish(self, jobs: list[Any]) -> None:
        self._retire(jobs, lambda job: None)  # out of the active set before anything can raise
        try:
            images = self.runner.decode(jobs)
        except Exception as exc:
            traceback.print_exc()
            for job in jobs:
                self._fail_by_model(job, "VAE decoding failed", exc)
            return
        for job, image in zip(jobs, images):
            job.answered = True
            try:
                job.sink.finish(image, job.request.seed)
            except Exception as exc:  # this client is gone: its job alone ends
                traceback.print_exc()
                self.stats.failed += 1
                _last_word(job, INTERNAL, f"the image could not be delivered: {exc}")
                continue
            self.stats.completed += 1

    def _report_progress(self, jobs: list[Any]) -> None:
        """Progress and previews as each request asked, and always for a step that first used
        a steer (even the last: its report comes before the image)."""
        broken = []
        for job in jobs:
            r = job.request
            applied = job.plan.steers_first_used_at(job.index - 1)
            want_preview = (
                not job.done and self.preview is not None and r.preview_every and job.index % r.preview_every == 0
            )
            want_progress = not job.done and r.progress_every and job.index % r.progress_every == 0
            if want_preview or want_progress or applied:
                try:
                    preview = self.preview(job.pred_x0, job.model) if want_preview else None
                    if applied:
                        job.sink.progress(job.index, len(job.timesteps), preview, steer_applied=applied)
                    else:
                        job.sink.progress(job.index, len(job.timesteps), preview)
                except Exception as exc:  # this job's stream broke, or its preview: it alone ends
                    traceback.print_exc()
                    broken.append((job, exc))
        for job, error in broken:
            self._retire(
                [job], partial(self._answer, code=INTERNAL, message=f"progress report failed: {error}", failed=True)
            )

    def _retire(self, jobs: list[Any], action: Callable[[Job], None]) -> None:
        gone = set(map(id, jobs))
        self.active = [j for j in self.active if id(j) not in gone]
        self._release(jobs)
        with self._lock:  # before the answer: a steer that finds it now hears it has finished
            for job in jobs:
                self.registry.end(job)
        for job in jobs:
            action(job)
        self.stats.active = len(self.active)

    def _release(self, jobs: list[Any]) -> None:
        """What admission took for the jobs (their LoRA adapters' residency), given back once."""
        release = getattr(self.runner, "release", None)  # test runners may hold nothing
        if release is not None:
            try:
                release([j for j in jobs if j.held_loras])
            except Exception:  # never let bookkeeping stop the answers
                traceback.print_exc()

    def _drop_ended_waiting(self) -> None:
        reasons: dict[int, str | None] = {}
        for job in self.scheduler.remove_waiting(lambda j: reasons.setdefault(id(j), _ended(j)) is not None):
            self._end(job, reasons[id(job)])

    def _drop_ended_active(self) -> None:
        ended = [(j, reason) for j in self.active if (reason := _ended(j)) is not None]
        if ended:
            reasons = {id(j): reason for j, reason in ended}
            self._retire([j for j, _ in ended], lambda job: self._end(job, reasons[id(job)]))

    def _end(self, job: Job, reason: str | None) -> None:
        if reason == CANCELLED:
            self.stats.cancelled += 1
            self._answer(job, CANCELLED, "request was cancelled")
        else:
            self.stats.expired += 1
            self._answer(
                job,
                UNAVAILABLE,
                f"deadline exceeded: timeout_s={job.request.timeout_s} passed before the image was ready",
            )

    def _fail_by_model(self, job: Job, what: str, exc: Exception) -> None:
        """A model call failed: INTERNAL (this request broke a model, a replay would too), or
        UNAVAILABLE when the cause passes (ResourceExhausted: out of GPU memory)."""
        code = UNAVAILABLE if isinstance(exc, ResourceExhausted) else INTERNAL
        self._answer(job, code, f"{what}: {exc}", failed=True)

    def _answer(self, job: Job, code: str, message: str, failed: bool = False) -> None:
        """The job's one final answer, an error; nothing when it was answered already."""
        if job.answered:
            return
        job.answered = True
        with self._lock:
            self.registry.end(job)
        if failed:
            self.stats.failed += 1
        _last_word(job, code, message)

    def _drain(self) -> None:
        """Fails the waiting jobs, steps the active ones until they finish or the grace ends,
        then fails those left: the end of the worker (or of `stop` for an engine never started)."""
        with self._lock:
            waiting = list(self.scheduler.waiting)
            self.scheduler.waiting.clear()
            self.stats.queued = 0
        for job in waiting:
            self._answer(job, UNAVAILABLE, SHUTTING_DOWN)
        while self.active and self._drain_until is not None and time.monotonic() < self._drain_until:
            try:
                self.run_iteration()
            except Exception:
                traceback.print_exc()
                self._fail_all_active("engine error")
        for job in self.active:
            self._answer(job, UNAVAILABLE, f"{SHUTTING_DOWN}: its drain grace period passed before the image was ready")
        self._release(self.active)
        self.active = []
        self.stats.active = 0

    def _fail_all_active(self, why: str) -> None:
        """After an unexpected error in the loop itself (a bug, not a model): the jobs in flight
        end now rather than never."""
        self._retire(list(self.active), lambda job: self._answer(job, INTERNAL, why, failed=True))

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._accepting:
                    break
                if not self.active and not self.scheduler.waiting:
                    self._lock.wait(0.5)
                    continue
            try:
                self.run_iteration()
            except Exception:  # keep serving
                traceback.print_exc()
                self._fail_all_active("engine error")
        self._drain()


def _ended(job: Job) -> str | None:
    """CANCELLED or UNAVAILABLE (deadline) when the job must leave now, else None."""
    try:
        if job.sink.cancelled():
            return CANCELLED
    except Exception:  # a sink that cannot tell has lost its client
        traceback.print_exc()
        return CANCELLED
    deadline = job.deadline
    if deadline is not None and time.monotonic() > deadline:
        return UNAVAILABLE
    return None


def _last_word(job: Job, code: str, message: str) -> None:
    """sink.fail that cannot raise: the worker outlives a client gone."""
    try:
        job.sink.fail(code, message)
    except Exception:
        traceback.print_exc()
