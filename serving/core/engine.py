"""The generation loop: a worker thread that admits, steps and finishes jobs.

`submit` only enqueues (it is what a decoupled Triton model's `execute` calls); the worker
thread runs iterations of: drop cancelled or expired jobs, admit and text-encode new ones,
one UNet call for the jobs the scheduler picked, report progress, decode and answer finished
jobs. Every submitted job ends in exactly one finish or fail.

`steer` (also called from Triton's thread) changes a queued or running job's prompt, negative
prompt or guidance scale; the next iteration's admission batch encodes the new texts together
with the new jobs' and installs them from the job's next step (serving/core/steering.py).
"""
from dataclasses import dataclass, replace
import threading
import time
import traceback

from serving.core.errors import CANCELLED, UNAVAILABLE
from serving.core.job import Job
from serving.core.runner import Runner
from serving.core.scheduler import QueueFull, StepScheduler
from serving.core.steering import GenerationRegistry, plan_pending_steers


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
    step_seconds: float = 0.0  # time in UNet steps (model call and DDIM update)
    last_rows: int = 0
    last_step_seconds: float = 0.0
    row_cap: int = 0  # UNet rows per call the scheduler may use

    def on_step(self, rows: int, seconds: float) -> None:
        self.last_rows, self.last_step_seconds = rows, seconds
        self.steps += 1
        self.rows += rows
        self.step_seconds += seconds


class Engine:
    def __init__(self, runner: Runner, scheduler: StepScheduler, preview=None):
        self.runner = runner
        self.scheduler = scheduler
        self.preview = preview  # callable(pred_x0 [C,h,w]) -> uint8 image, or None
        self.active: list = []
        self.stats = EngineStats()
        self.registry = GenerationRegistry()  # jobs by request id, for steers
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="ldm-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        """Queues a job; raises QueueFull when the admission queue is at its bound."""
        with self._lock:
            if self._stopping:
                raise QueueFull("server is shutting down")
            try:
                self.scheduler.enqueue(job)
            except QueueFull:
                self.stats.rejected += 1
                raise
            self.registry.add(job)
            self.stats.queued = len(self.scheduler.waiting)
            self._lock.notify()

    def steer(self, request_id: str, changes: dict, check) -> int:
        """Accepts a steer of the queued or running job named `request_id`: its request takes
        `changes` (a subset of prompt, negative_prompt, guidance_scale) at once, so a later steer
        builds on it; `check(job, steered_request)` validates them (raises InvalidInput). Returns
        the steer id (1, 2, ... per job). Raises SteerRefused (NOT_FOUND, FAILED_PRECONDITION)."""
        with self._lock:
            job = self.registry.find(request_id)
            steered = replace(job.request, **changes)
            check(job, steered)
            job.request = steered
            job.steers += 1
            job.pending_steers.append(job.steers)
            self.stats.steers += 1
            self._lock.notify()
            return job.steers

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the worker; jobs not yet finished get UNAVAILABLE."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            leftovers = list(self.scheduler.waiting) + self.active
            self.scheduler.waiting.clear()
            self.active = []
            for job in leftovers:
                self.registry.end(job)
        for job in leftovers:
            _fail(job, UNAVAILABLE, "server is shutting down")

    def run_iteration(self) -> bool:
        """One iteration of the loop; False when there was nothing to do."""
        with self._lock:
            self._drop_ended_waiting()
            admitted = self.scheduler.admit(self.active)
            steered = [j for j in self.active if j.pending_steers]
            for job in (*admitted, *steered):
                plan_pending_steers(job)
            self.stats.queued = len(self.scheduler.waiting)
        self._drop_ended_active()
        if admitted or steered:
            try:
                self.runner.admit(admitted, steered)
                self.active.extend(admitted)
            except Exception as exc:  # a failed text-encoder call fails these jobs, not the server
                with self._lock:
                    for job in admitted:
                        self.registry.end(job)
                for job in admitted:
                    _fail(job, UNAVAILABLE, f"text encoding failed: {exc}")
                running = [j for j in steered if j in self.active]
                self._retire(running, lambda job: _fail(job, UNAVAILABLE, f"text encoding of a steer failed: {exc}"))
                self.stats.failed += len(admitted) + len(running)
        for job in self.active:  # the conditioning of each job's next step (a switch is an assignment)
            job.conditioning = job.plan.conditioning_at(job.index)
        self.stats.active = len(self.active)
        chosen = self.scheduler.pick(self.active)
        if not chosen:
            return bool(admitted)
        started = time.perf_counter()
        try:
            self.runner.step(chosen)
        except Exception as exc:
            traceback.print_exc()
            self._retire(chosen, lambda job: _fail(job, UNAVAILABLE, f"denoising step failed: {exc}"))
            self.stats.failed += len(chosen)
            return True
        self.stats.on_step(sum(j.rows for j in chosen), time.perf_counter() - started)
        self._report_progress(chosen)
        finished = [j for j in chosen if j.done]
        if finished:
            self._finish(finished)
        return True

    def _finish(self, jobs: list) -> None:
        try:
            images = self.runner.decode(jobs)
        except Exception as exc:
            self._retire(jobs, lambda job: _fail(job, UNAVAILABLE, f"VAE decoding failed: {exc}"))
            self.stats.failed += len(jobs)
            return
        for job, image in zip(jobs, images):
            job.sink.finish(image, job.request.seed)
        self.stats.completed += len(jobs)
        self._retire(jobs, lambda job: None)

    def _report_progress(self, jobs: list) -> None:
        """Progress and previews as each request asked, and always for a step that first used
        a steer (even the last: its report comes before the image)."""
        for job in jobs:
            r = job.request
            total = len(job.timesteps)
            applied = job.plan.steers_first_used_at(job.index - 1)
            if job.done:
                if applied:
                    job.sink.progress(job.index, total, None, steer_applied=applied)
                continue
            want_preview = self.preview is not None and r.preview_every and job.index % r.preview_every == 0
            want_progress = r.progress_every and job.index % r.progress_every == 0
            if want_preview or want_progress or applied:
                preview = self.preview(job.pred_x0) if want_preview else None
                if applied:
                    job.sink.progress(job.index, total, preview, steer_applied=applied)
                else:
                    job.sink.progress(job.index, total, preview)

    def _retire(self, jobs: list, action) -> None:
        gone = set(map(id, jobs))
        self.active = [j for j in self.active if id(j) not in gone]
        with self._lock:  # before the answer: a steer that finds it now hears it has finished
            for job in jobs:
                self.registry.end(job)
        for job in jobs:
            action(job)
        self.stats.active = len(self.active)

    def _drop_ended_waiting(self) -> None:
        for job in self.scheduler.remove_waiting(lambda j: _ended(j) is not None):
            self.registry.end(job)
            self._end(job)

    def _drop_ended_active(self) -> None:
        ended = [j for j in self.active if _ended(j) is not None]
        if ended:
            self._retire(ended, self._end)

    def _end(self, job: Job) -> None:
        reason = _ended(job)
        if reason == CANCELLED:
            self.stats.cancelled += 1
            _fail(job, CANCELLED, "request was cancelled")
        else:
            self.stats.expired += 1
            _fail(job, UNAVAILABLE, f"deadline exceeded: timeout_s={job.request.timeout_s} passed before the image was ready")

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                if not self.active and not self.scheduler.waiting:
                    self._lock.wait(0.5)
                    continue
            try:
                self.run_iteration()
            except Exception:  # keep serving; the jobs involved were already failed
                traceback.print_exc()


def _ended(job: Job):
    """CANCELLED or UNAVAILABLE (deadline) when the job must leave now, else None."""
    if job.sink.cancelled():
        return CANCELLED
    deadline = job.deadline
    if deadline is not None and time.monotonic() > deadline:
        return UNAVAILABLE
    return None


def _fail(job: Job, code: str, message: str) -> None:
    try:
        job.sink.fail(code, message)
    except Exception:
        traceback.print_exc()

