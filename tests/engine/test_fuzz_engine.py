"""Fuzzing the pipeline in process: hostile inputs over every field of the contract
(tests/support/fuzz_inputs.py) through PipelineService.submit into the running engine (its worker
thread, ONNX Runtime on the tiny checkpoint). Every request gets exactly one answer, an image
or a coded error naming a field; the worker thread survives; the engine ends empty.

The default suite runs FUZZ_BATCHES batches; `-m slow` runs the 10,000-case figure of
docs/reliability.md (its command prints the tally)."""

from collections import Counter
import threading

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from tests.support.fuzz_inputs import check_answer, request_inputs
from tests.support.fakes import make_service

BATCH = 25  # requests submitted together (they share the engine's batches)


class WaitingSink:
    def __init__(self):
        self.done = threading.Event()
        self.answers = []
        self.image = self.error = None

    def progress(self, step, total, preview, steer_applied=()):
        assert not self.done.is_set(), "progress after the final answer"

    def finish(self, image, seed):
        self.answers.append("finish")
        self.image = image
        self.done.set()

    def fail(self, code, message):
        self.answers.append("fail")
        self.error = (code, message)
        self.done.set()

    def cancelled(self):
        return False


@pytest.fixture(scope="module")
def fuzzed_service(tiny_repo, models):
    # few steps so the accepted requests cost little; the limits the fuzz probes stay real
    service = make_service(tiny_repo, models, default_steps=2, max_steps=3, max_queue=10_000).start()
    yield service
    service.stop(grace_s=0)


def run_fuzz(service, batches, tally):
    @settings(
        max_examples=batches,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(st.lists(request_inputs(), min_size=BATCH, max_size=BATCH))
    def fuzz(batch):
        sinks = [WaitingSink() for _ in batch]
        for inputs, sink in zip(batch, sinks):
            service.submit(inputs, sink)
        for inputs, sink in zip(batch, sinks):
            assert sink.done.wait(120), f"no answer for {inputs}"
            assert len(sink.answers) == 1, sink.answers
            tally[check_answer(inputs, sink.image, sink.error)] += 1

    fuzz()
    assert service.engine._thread.is_alive()
    assert service.engine.active == [] and len(service.engine.scheduler.waiting) == 0


def report(tally):
    total = sum(tally.values())
    print(f"\nfuzz in process: {total} requests; outcomes: " + ", ".join(f"{k} {v}" for k, v in tally.most_common()))


def test_fuzz_in_process(fuzzed_service):
    tally = Counter()
    run_fuzz(fuzzed_service, 40, tally)  # 1,000 requests
    report(tally)
    assert tally["image"] > 0 and sum(tally.values()) == 40 * BATCH


@pytest.mark.slow
def test_fuzz_in_process_10k(fuzzed_service):
    tally = Counter()
    run_fuzz(fuzzed_service, 400, tally)  # 10,000 requests
    report(tally)
    assert sum(tally.values()) == 400 * BATCH
