"""The step scheduler alone: admission, row cap, latent-size fairness, request-at-a-time mode."""

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from serving.core.job import Job
from serving.core.request import GenerationRequest
from serving.core.scheduler import QueueFull, BatchingConfig, StepScheduler


def job(size=32, guidance=5.0, arrival=0.0):
    request = GenerationRequest("p", "", 0, 10, guidance, size, size, 0.0)
    j = Job(request, sink=None, arrival=arrival)
    j.latents = np.zeros((4, size // 4, size // 4), np.float32)
    return j


def test_admission_is_bounded_and_in_arrival_order():
    scheduler = StepScheduler(BatchingConfig(max_active=3, max_queue=4))
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
    scheduler = StepScheduler(BatchingConfig(max_rows=5))
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
    scheduler = StepScheduler(BatchingConfig(max_rows=32))
    small = [job(32, arrival=0), job(32, arrival=2)]
    large = [job(64, arrival=1)]
    active = small + large
    calls = [scheduler.pick(active) for _ in range(4)]
    for chosen in calls:
        assert len({j.latent_shape for j in chosen}) == 1
    assert [chosen[0].latent_shape[1] for chosen in calls] == [8, 16, 8, 16]
    assert calls[0] == small


def test_single_job_larger_than_the_cap_still_runs():
    scheduler = StepScheduler(BatchingConfig(max_rows=1))
    only = job(guidance=7.5)
    assert scheduler.pick([only]) == [only]


def test_request_at_a_time_mode():
    scheduler = StepScheduler(BatchingConfig(step_batching=False))
    jobs = [job(arrival=i) for i in range(3)]
    for j in jobs:
        scheduler.enqueue(j)
    assert scheduler.admit([]) == [jobs[0]]
    assert scheduler.admit([jobs[0]]) == []
    assert scheduler.pick(jobs) == [jobs[0]]


def test_a_stream_of_new_jobs_of_one_size_does_not_starve_a_running_job_of_another():
    scheduler = StepScheduler(BatchingConfig(max_rows=32, max_active=4, max_queue=64))
    running = job(64, arrival=0)
    scheduler.enqueue(running)
    active = scheduler.admit([])
    assert scheduler.pick(active) == [running]
    steps_of_running = 0
    for i in range(12):  # a short 32-pixel job arrives at every iteration; one leaves as one comes
        scheduler.enqueue(job(32, arrival=1 + i))
        if len(active) == 4:
            active.remove(next(j for j in active if j is not running))
        active += scheduler.admit(active)
        steps_of_running += running in scheduler.pick(active)
    assert steps_of_running >= 12 // 4  # K = max_active: at least one step in every 4 calls


def test_a_smaller_job_fills_the_rows_a_larger_one_left():
    scheduler = StepScheduler(BatchingConfig(max_rows=3))
    leader, two, one = job(arrival=0), job(arrival=1), job(guidance=1.0, arrival=2)  # 2, 2 and 1 rows
    assert scheduler.pick([leader, two, one]) == [leader, one]


def fake_rows(j, rows):
    """A job whose conditioning takes `rows` UNet rows (as a regional prompt's would)."""
    from types import SimpleNamespace

    j.conditioning = SimpleNamespace(rows=rows, network="base")
    return j


arrivals = st.lists(  # per iteration: the jobs arriving (latent size, rows, steps, served model)
    st.lists(
        st.tuples(st.sampled_from([32, 48, 64]), st.integers(1, 8), st.integers(1, 6), st.sampled_from(["sd", "sdxl"])),
        max_size=3,
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(max_rows=st.integers(2, 8), max_active=st.integers(1, 6), arrivals=arrivals)
def test_fairness_bound_and_row_cap_over_random_arrivals(max_rows, max_active, arrivals):
    """The docstring's bound (K = max_active): an active job is never left out of more than
    max_active - 1 consecutive calls; every call fits the row cap, holds one call key (so one
    served model: two models' jobs arrive mixed), and leaves out no job of its key that would
    still fit."""
    scheduler = StepScheduler(BatchingConfig(max_rows=max_rows, max_active=max_active, max_queue=10_000))
    active, left, waited, arrival = [], {}, {}, 0
    for iteration in range(len(arrivals) + 10_000):
        for size, rows, steps, model in arrivals[iteration] if iteration < len(arrivals) else []:
            j = fake_rows(job(size, arrival=arrival), min(rows, max_rows))
            j.model = model
            arrival += 1
            left[id(j)] = steps
            scheduler.enqueue(j)
        admitted = scheduler.admit(active)
        active += admitted
        for j in admitted:
            waited[id(j)] = 0
        if not active:
            if iteration >= len(arrivals) and not scheduler.waiting:
                break
            continue
        chosen = scheduler.pick(active)
        keys = {j.call_key for j in chosen}
        used = sum(j.rows for j in chosen)
        assert len(keys) == 1 and used <= max_rows and len({j.model for j in chosen}) == 1
        for j in active:
            if j not in chosen:
                assert j.call_key not in keys or used + j.rows > max_rows  # no row wasted
                waited[id(j)] += 1
                assert waited[id(j)] <= max_active - 1
        for j in chosen:
            waited[id(j)] = 0
            left[id(j)] -= 1
        active = [j for j in active if left[id(j)] > 0]
    assert not active and not scheduler.waiting
