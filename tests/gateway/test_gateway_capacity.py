"""Load shedding at the gateway (serving/gateway/capacity.py): units over asyncio, then a real
gateway in front of a tritonserver whose pipeline holds two jobs, refusing the third itself."""

import asyncio
import json
import re
import shutil
import socket

import pytest

from serving.gateway.capacity import Capacity
from serving.gateway.errors import ApiError
from tests.support.server_metrics import metrics, wait_for


def run(coroutine):
    return asyncio.run(coroutine)


def test_without_the_pipelines_slots_everything_is_admitted():
    async def scenario():
        capacity = Capacity(wait_s=0.0)
        capacity.take(1000)
        await capacity.wait_for_room(8)

    run(scenario())


def test_a_full_pipeline_refuses_after_the_wait_with_retry_after():
    async def scenario():
        capacity = Capacity(wait_s=0.01, share=1.0)  # one caller here: its share is all
        capacity.configure(running=1, queued=1)
        capacity.take(2)
        with pytest.raises(ApiError) as info:
            await capacity.wait_for_room(1)
        assert info.value.code == "UNAVAILABLE" and info.value.retry_after_s >= 1
        assert "2 of 2 slots taken" in info.value.message
        assert capacity.in_flight == 2 and capacity.waiting == 0

    run(scenario())


def test_waiters_get_freed_slots_in_order_and_never_exceed_them():
    async def scenario():
        capacity = Capacity(wait_s=30.0, share=1.0)
        capacity.configure(running=1, queued=1)
        capacity.take(2)
        admitted, peak = [], []

        async def request(name):
            await capacity.wait_for_room(1)
            capacity.take(1)  # what `events` does at once
            admitted.append(name)
            peak.append(capacity.in_flight)

        tasks = [asyncio.create_task(request(i)) for i in range(3)]
        while capacity.waiting < 3:
            await asyncio.sleep(0)
        capacity.release(1)
        while not admitted:
            await asyncio.sleep(0)
        for _ in range(10):  # the others stay waiting: no room
            await asyncio.sleep(0)
        assert admitted == [0]
        capacity.release(2)
        await asyncio.gather(*tasks)
        assert admitted == [0, 1, 2] and max(peak) <= 2

    run(scenario())


def test_slots_held_by_others_count_and_a_newcomer_queues_behind_waiters():
    async def scenario():
        capacity = Capacity(wait_s=30.0)
        capacity.configure(running=2, queued=2)
        capacity.observe(engine_load=4)  # the operator's KServe clients hold every slot
        waiter = asyncio.create_task(capacity.wait_for_room(1))
        while capacity.waiting < 1:
            await asyncio.sleep(0)
        capacity.observe(engine_load=3)
        await waiter
        capacity.take(1)
        assert not capacity.room(1)

    run(scenario())


def test_past_the_waiting_bound_refusals_are_immediate():
    async def scenario():
        capacity = Capacity(wait_s=30.0, max_waiting=1, share=1.0)
        capacity.configure(running=1, queued=0)
        capacity.take(1)
        first = asyncio.create_task(capacity.wait_for_room(1))
        while capacity.waiting < 1:
            await asyncio.sleep(0)
        with pytest.raises(ApiError):
            await capacity.wait_for_room(1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert capacity.waiting == 0

    run(scenario())


def test_a_bad_wait_is_refused():
    with pytest.raises(ValueError, match="admission wait"):
        Capacity(wait_s=float("inf"))


# --- a real gateway in front of a pipeline of two slots ----------------------------------------


@pytest.fixture(scope="module")
def two_slot_stack(tiny_repo, tmp_path_factory, triton_servers):
    """The tiny repository with max_active 1 and max_queue 1, served, with a gateway in front
    (whose one caller here, this address, may hold every slot)."""
    from serving.gateway.process import GatewayProcess

    work = tmp_path_factory.mktemp("capacity")
    repo = work / "repo"
    shutil.copytree(tiny_repo, repo)
    config = repo / "pipeline" / "config.pbtxt"
    text = config.read_text()
    for key, value in (("max_active", 1), ("max_queue", 1)):
        text, count = re.subn(rf'(key: "{key}"\s*value \{{\s*string_value: )"\d+"', rf'\1"{value}"', text)
        assert count == 1, key
    config.write_text(text)
    with (
        triton_servers.running(repo, "tritonserver-capacity") as server,
        GatewayProcess(
            server.grpc_url,
            log_file=work / "gateway.log",
            control_secret=server.control_secret,
            extra_args=["--admission-wait-s", "0.2", "--max-key-share", "1"],
        ) as gateway,
    ):
        yield server, gateway


def _long_generation(gateway) -> socket.socket:
    body = json.dumps({"prompt": "a red circle", "steps": 150, "size": "64x64"}).encode()
    host, port = gateway.rest_url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    connection.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    return connection


def test_the_gateway_refuses_what_the_pipeline_cannot_hold_before_triton_sees_it(two_slot_stack):
    import urllib.error
    import urllib.request

    from serving.client.images import ImagesClient, ImagesError

    server, gateway = two_slot_stack
    connections = [_long_generation(gateway)]
    try:
        assert wait_for(lambda: metrics(server)["ldm_active_requests"] == 1)
        connections.append(_long_generation(gateway))
        assert wait_for(lambda: metrics(server)["ldm_queue_length"] == 1)
        rejected = metrics(server).get("ldm_rejections_total", 0)
        request = urllib.request.Request(
            gateway.rest_url + "/v1/images/generations",
            method="POST",
            data=json.dumps({"prompt": "a blue square", "steps": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=30)
        answer = json.loads(info.value.read())
        assert info.value.code == 503 and int(info.value.headers["Retry-After"]) >= 1, answer
        assert "the pipeline is full" in answer["error"]["message"]
        with ImagesClient(gateway.grpc_url) as client, pytest.raises(ImagesError) as error:
            client.generate("a blue square", steps=2)
        assert error.value.code == "UNAVAILABLE"
        # refused at the edge: the engine never saw them
        assert metrics(server).get("ldm_rejections_total", 0) == rejected
    finally:
        for connection in connections:
            connection.close()
    assert wait_for(lambda: metrics(server)["ldm_active_requests"] + metrics(server)["ldm_queue_length"] == 0)
