"""Work, not calls (serving/gateway/costs.py), and fair admission across keys
(serving/gateway/capacity.py) as a property over two keys."""

import asyncio

from hypothesis import given, settings, strategies as st
import pytest

from serving.gateway.capacity import Capacity
from serving.gateway.costs import MAX_STEERS, MIN_IMAGE_UNITS, STEER_BURST, STEERS_PER_S, SteerBudget, work_units
from serving.gateway.errors import ApiError
from serving.gateway.generation import Generation
from serving.gateway.pipeline import PipelineModel

MODEL = PipelineModel({}, {"default_steps": "25", "native_size": "64", "default_guidance_scale": "5.0"})


@pytest.mark.parametrize(
    "inputs, n, units",
    [
        ({}, 1, 1.0),  # the default image: one unit
        ({"steps": 50}, 2, 4.0),  # twice the steps, two images
        ({"height": 128, "width": 128}, 1, 4.0),  # four times the pixels
        ({"guidance_scale": 1.0}, 1, 0.5),  # no guidance: one UNet row
        ({"region_prompts": ["a", "b", "c"]}, 1, 4.0),  # three regions and the base, each guided
        ({"steps": 1, "height": 32, "width": 32}, 1, MIN_IMAGE_UNITS),  # every call costs something
    ],
)
def test_a_request_costs_its_work(inputs, n, units):
    assert work_units(Generation("a red circle", inputs, n=n), MODEL) == pytest.approx(units)


def test_without_a_native_size_a_request_is_charged_at_it():
    old = PipelineModel({}, {"default_steps": "25"})
    assert work_units(Generation("x", {"height": 512, "width": 512, "steps": 50}), old) == pytest.approx(2.0)


def test_a_live_generation_takes_a_bounded_number_and_rate_of_steers():
    budget, now = SteerBudget(at=0.0), 0.0
    for _ in range(int(STEER_BURST)):
        budget.take("g", now)
    with pytest.raises(ApiError) as info:
        budget.take("g", now)
    assert info.value.code == "RESOURCE_EXHAUSTED" and info.value.retry_after_s == pytest.approx(1 / STEERS_PER_S)
    while budget.used < MAX_STEERS:
        now += 1 / STEERS_PER_S
        budget.take("g", now)
    with pytest.raises(ApiError) as info:
        budget.take("g", now + 3600)
    assert f"its {MAX_STEERS} steers" in info.value.message
    budget.give_back()
    budget.take("g", now + 3600)


# --- fair admission: one key cannot take the pipeline from another ----------------------------


@settings(max_examples=200, deadline=None)
@given(
    slots=st.tuples(st.integers(1, 8), st.integers(0, 16)),
    ops=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["ask", "ask", "done"]), st.integers(1, 4)), max_size=60
    ),
)
def test_two_keys_share_the_pipeline(slots, ops):
    """Whatever key A does, key B gets room whenever the pipeline has some and B is under its
    share; neither key exceeds its share, and together they never exceed the slots."""

    async def scenario():
        capacity = Capacity(wait_s=0.0)  # no waiting: each ask is admitted now or refused now
        capacity.configure(*slots)
        held = {"a": [], "b": []}
        for key, op, n in ops:
            if op == "done":
                if held[key]:
                    capacity.release(held[key].pop(0), key)
                continue
            other = "b" if key == "a" else "a"
            used = capacity.in_flight
            fits = (used + n <= capacity.slots or used == 0) and (
                sum(held[key]) + n <= capacity.caller_cap() or not held[key]
            )
            try:
                await capacity.wait_for_room(n, key)
            except ApiError:
                assert not fits, (key, n, held)  # refused only when the pipeline or its share is full
                continue
            assert fits, (key, n, held)
            capacity.take(n, key)
            held[key].append(n)
            for k in held:
                assert sum(held[k]) <= max(capacity.caller_cap(), max(held[k], default=0)), held
            assert capacity.in_flight <= max(capacity.slots, n)
            # the other key's share is never taken by this one
            assert sum(held[key]) <= capacity.caller_cap() or len(held[key]) == 1
            assert (
                capacity.slots - sum(held[key]) >= min(capacity.slots - capacity.caller_cap(), capacity.slots)
                or len(held[key]) == 1
            ), (held, other)

    asyncio.run(scenario())


def test_a_key_at_its_share_does_not_hold_up_another_keys_request():
    """Key A's waiting requests (blocked by A's share) do not queue key B behind them."""

    async def scenario():
        capacity = Capacity(wait_s=30.0)
        capacity.configure(running=2, queued=2)  # 4 slots, 2 per key
        capacity.take(2, "a")

        async def enter(n, key):  # what admit then events do, with no await between
            await capacity.wait_for_room(n, key)
            capacity.take(n, key)

        waiting_a = [asyncio.create_task(enter(1, "a")) for _ in range(5)]
        while capacity.waiting < 5:
            await asyncio.sleep(0)
        await asyncio.wait_for(enter(2, "b"), timeout=5)  # room, and B's share free
        capacity.release(1, "a")  # A is under its share again: its oldest waiter goes
        await asyncio.wait_for(waiting_a[0], timeout=5)
        for _ in range(10):
            await asyncio.sleep(0)
        assert not any(t.done() for t in waiting_a[1:]) and capacity.by_caller == {"a": 2, "b": 2}
        for task in waiting_a[1:]:
            task.cancel()
        await asyncio.gather(*waiting_a[1:], return_exceptions=True)
        assert capacity.waiting == 0

    asyncio.run(scenario())
