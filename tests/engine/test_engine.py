"""The engine in this process (ONNX Runtime, no server): batch invariance, progress, cancellation,
deadlines and every-request-ends, driven one iteration at a time."""
import time

import numpy as np
import pytest

from serving.core.config import PipelineConfig
from serving.models.onnx import LocalModels
from serving.core.service import PipelineAssets, PipelineService


class RecordingSink:
    def __init__(self, cancel_after_step=None):
        self.image = self.error = None
        self.progress_log, self.previews = [], []
        self.steered = []  # (step count, steer ids first used by that step)
        self.events = []  # "progress", "image", "error" in order
        self.cancel_after_step = cancel_after_step
        self.ends = 0

    def progress(self, step, total, preview, steer_applied=()):
        self.progress_log.append((step, total))
        self.events.append("progress")
        if preview is not None:
            self.previews.append(preview)
        if steer_applied:
            self.steered.append((step, tuple(steer_applied)))

    def finish(self, image, seed):
        self.image, self.ends = image, self.ends + 1
        self.events.append("image")

    def fail(self, code, message):
        self.error, self.ends = (code, message), self.ends + 1
        self.events.append("error")

    def cancelled(self):
        return self.cancel_after_step is not None and len(self.progress_log) >= self.cancel_after_step


@pytest.fixture(scope="module")
def models(tiny_repo):
    return LocalModels(tiny_repo)


def make_service(tiny_repo, models, **params):
    return PipelineService(PipelineAssets.read(tiny_repo / "pipeline" / "1"), PipelineConfig.parse({k: str(v) for k, v in params.items()}), models)


def request(prompt, seed, **fields):
    arrays = {"prompt": np.array([prompt.encode()], object), "seed": np.array([seed])}
    types = {"steps": np.int32, "guidance_scale": np.float32, "eta": np.float32, "height": np.int32, "width": np.int32,
             "progress_every": np.int32, "preview_every": np.int32, "timeout_s": np.float32}
    arrays.update({k: np.array([v.encode()], object) if isinstance(v, str) else np.array([v], types[k]) for k, v in fields.items()})
    return arrays


def drain(service, limit=10_000):
    for _ in range(limit):
        if not service.engine.run_iteration():
            return
    raise AssertionError("engine did not settle")


TARGET = ("a large red circle on the left", 1234, dict(steps=12, guidance_scale=5.0))
CROWD = [
    ("a blue square", 1, dict(steps=20, guidance_scale=7.5)),
    ("a green triangle at the top", 2, dict(steps=8, guidance_scale=1.0)),
    ("a yellow star", 3, dict(steps=15, guidance_scale=3.0, eta=0.5)),
    ("a small purple circle", 4, dict(steps=12, guidance_scale=5.0)),
    ("two cats", 5, dict(steps=30, guidance_scale=5.0, height=48, width=48)),
    ("an orange square on the right", 6, dict(steps=10, guidance_scale=9.0, eta=1.0)),
    ("a white circle", 7, dict(steps=25, guidance_scale=2.0)),
    ("a black background", 8, dict(steps=12, guidance_scale=5.0, height=24, width=40)),
]


def alone_and_in_a_crowd(repo, models) -> tuple:
    """TARGET's image served alone, and served joining CROWD mid-flight (a batched run, checked)."""
    service = make_service(repo, models)
    alone = RecordingSink()
    service.submit(request(TARGET[0], TARGET[1], **TARGET[2]), alone)
    drain(service)

    service = make_service(repo, models)
    crowd = [RecordingSink() for _ in CROWD]
    for (prompt, seed, fields), sink in zip(CROWD[:4], crowd):
        service.submit(request(prompt, seed, **fields), sink)
    for _ in range(3):  # the crowd is mid-flight when the target joins
        service.engine.run_iteration()
    together = RecordingSink()
    service.submit(request(TARGET[0], TARGET[1], **TARGET[2]), together)
    for (prompt, seed, fields), sink in zip(CROWD[4:], crowd[4:]):
        service.submit(request(prompt, seed, **fields), sink)
    drain(service)
    assert service.engine.stats.rows >= 3 * service.engine.stats.steps  # it really ran batched (alone: 2 rows)
    assert all(s.image is not None and s.ends == 1 for s in crowd)
    return alone, together


def test_image_does_not_depend_on_batch_mates(tiny_repo, models):
    alone, together = alone_and_in_a_crowd(tiny_repo, models)
    assert together.image.tobytes() == alone.image.tobytes()  # bit-identical, as the README says


def test_progress_and_previews_every_k_steps(tiny_repo, models):
    service = make_service(tiny_repo, models)
    sink = RecordingSink()
    service.submit(request("a red circle", 9, steps=10, progress_every=2, preview_every=5), sink)
    drain(service)
    assert sink.progress_log == [(2, 10), (4, 10), (5, 10), (6, 10), (8, 10)]
    assert len(sink.previews) == 1 and sink.previews[0].shape == (8, 8, 3) and sink.previews[0].dtype == np.uint8
    assert sink.image.shape == (32, 32, 3)


def test_cancelled_job_leaves_within_one_step(tiny_repo, models):
    service = make_service(tiny_repo, models)
    cancelled, other = RecordingSink(cancel_after_step=3), RecordingSink()
    service.submit(request("a red circle", 1, steps=50, progress_every=1), cancelled)
    service.submit(request("a blue circle", 2, steps=8), other)
    while len(cancelled.progress_log) < 3:
        service.engine.run_iteration()
    service.engine.run_iteration()
    assert cancelled.error[0] == "CANCELLED" and cancelled.ends == 1
    assert len(cancelled.progress_log) == 3  # it took no further step
    assert service.engine.active == [j for j in service.engine.active if j.sink is other]
    drain(service)
    assert other.image is not None and service.engine.stats.cancelled == 1


class DeadlineSink(RecordingSink):
    """Holds the engine at its first progress report until the job's deadline has passed, so
    the deadline falls mid-generation on any machine (no assumption on how long steps take)."""

    job = None

    def progress(self, step, total, preview):
        super().progress(step, total, preview)
        while (left := self.job.deadline - time.monotonic()) >= 0:  # until the deadline has passed
            time.sleep(left + 0.001)


def test_deadline_ends_a_job_with_unavailable(tiny_repo, models):
    service = make_service(tiny_repo, models)
    sink = DeadlineSink()
    service.submit(request("a red circle", 1, steps=150, timeout_s=0.05, progress_every=1), sink)
    sink.job = service.engine.scheduler.waiting[0]
    drain(service)
    assert sink.error[0] == "UNAVAILABLE" and "deadline exceeded" in sink.error[1]
    assert len(sink.progress_log) <= 1  # no step after its deadline (held at step 1 until it passed)
    assert service.engine.stats.expired == 1


def test_full_queue_refuses_and_every_accepted_request_ends(tiny_repo, models):
    service = make_service(tiny_repo, models, max_active=2, max_queue=3)
    sinks = [RecordingSink() for _ in range(12)]
    for i, sink in enumerate(sinks):
        service.submit(request("a red circle", i, steps=3), sink)
    drain(service)
    assert all(s.ends == 1 for s in sinks)
    refused = [s for s in sinks if s.error]
    assert len(refused) == 12 - 3 and all(s.error[0] == "UNAVAILABLE" for s in refused)
    assert sum(s.image is not None for s in sinks) == 3
    assert service.engine.stats.rejected == 9


def test_malformed_config_parameters_are_named(tiny_repo, models):
    with pytest.raises(ValueError, match=r"parameter max_rows='many' is not a valid int"):
        make_service(tiny_repo, models, max_rows="many")
    with pytest.raises(ValueError, match=r"parameter step_batching='yes' must be true or false"):
        make_service(tiny_repo, models, step_batching="yes")
