"""The engine in this process (ONNX Runtime, no server): batch invariance, progress, cancellation,
deadlines and every-request-ends, driven one iteration at a time."""

import time

import numpy as np
import pytest

from tests.support.fakes import RecordingSink, alone_and_in_a_crowd, drain, make_service, request


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

    def progress(self, step, total, preview, steer_applied=()):
        super().progress(step, total, preview, steer_applied)
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
