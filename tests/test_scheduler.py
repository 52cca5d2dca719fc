"""The step scheduler alone: admission, row cap, latent-size fairness, request-at-a-time mode."""
import numpy as np
import pytest

from serving.core.job import Job
from serving.core.request import GenerationRequest
from serving.core.scheduler import QueueFull, SchedulerConfig, StepScheduler


def job(size=32, guidance=5.0, arrival=0.0):
    request = GenerationRequest("p", "", 0, 10, guidance, size, size, 0.0)
    j = Job(request, sink=None, arrival=arrival)
    j.latents = np.zeros((4, size // 4, size // 4), np.float32)
    return j


def test_admission_is_bounded_and_in_arrival_order():
    scheduler = StepScheduler(SchedulerConfig(max_active=3, max_queue=4))
    jobs = [job(arrival=i) for i in range(4)]
    for j in jobs:
        scheduler.enqueue(j)
    with pytest.raises(QueueFull):
        scheduler.enqueue(job())
    active = [jobs[0]]
    scheduler.waiting.popleft()
    assert scheduler.admit(active) == jobs[1:3]
    assert list(scheduler.waiting) == [jobs[3]]


def test_row_cap_bounds_each_call_and_everyone_gets_a_turn():
    scheduler = StepScheduler(SchedulerConfig(max_rows=5))
    active = [job(arrival=i) for i in range(4)] + [job(guidance=1.0, arrival=4)]
    steps = {id(j): 0 for j in active}
    for _ in range(6):
        chosen = scheduler.pick(active)
        assert sum(j.rows for j in chosen) == 5  # 2+2+1: the 1-row job fills what two 2-row ones leave
        for j in chosen:
            steps[id(j)] += 1
    # over 6 calls every 2-row job steps 3 times (none starves) and the 1-row job every time
    assert [steps[id(j)] for j in active] == [3, 3, 3, 3, 6]


def test_one_latent_size_per_call_and_sizes_alternate():
    scheduler = StepScheduler(SchedulerConfig(max_rows=32))
    small = [job(32, arrival=0), job(32, arrival=2)]
    large = [job(64, arrival=1)]
    active = small + large
    calls = [scheduler.pick(active) for _ in range(4)]
    for chosen in calls:
        assert len({j.latent_shape for j in chosen}) == 1
    assert [chosen[0].latent_shape[1] for chosen in calls] == [8, 16, 8, 16]
    assert calls[0] == small


def test_single_job_larger_than_the_cap_still_runs():
    scheduler = StepScheduler(SchedulerConfig(max_rows=1))
    only = job(guidance=7.5)
    assert scheduler.pick([only]) == [only]


def test_request_at_a_time_mode():
    scheduler = StepScheduler(SchedulerConfig(step_batching=False))
    jobs = [job(arrival=i) for i in range(3)]
    for j in jobs:
        scheduler.enqueue(j)
    assert scheduler.admit([]) == [jobs[0]]
    assert scheduler.admit([jobs[0]]) == []
    assert scheduler.pick(jobs) == [jobs[0]]
