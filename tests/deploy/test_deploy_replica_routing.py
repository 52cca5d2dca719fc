"""A steer or DELETE reaches the replica that runs the generation: two `ldm serve` replicas
(tritonserver + gateway, each told its name and its peers as a pod is) behind Debian's nginx
doing per-request round robin over their REST ports (deploy/nginx/ldm-rest-lb.conf.template).
A generation started through the load balancer is steered through it until a steer lands on
the other replica; that gateway forwards it to the owner, which applies it (the stream reports
the steer at a step). A DELETE through the balancer cancels it wherever it lands; ids naming no
replica are 404 and are never fetched from; every process started is gone afterwards."""

import asyncio

import psutil
import pytest

from serving.client.generations import GenerationError, GenerationsClient
from tests.lb.nginx import NginxRestLB
from tests.lb.replicas import start_replicas, stop_all
from tests.lb.tools import require

LONG = {"prompt": "a small green square at the top", "steps": 150, "size": "64x64", "seed": 5}


@pytest.fixture(scope="module")
def fleet(tiny_repo, tmp_path_factory):
    require("nginx")
    workdir = tmp_path_factory.mktemp("routing")
    replicas = start_replicas(2, tiny_repo, workdir / "replicas", timeout_s=150)
    lb = None
    try:
        lb = NginxRestLB(workdir / "nginx", [r.rest_port for r in replicas]).start()
        yield replicas, lb
    finally:
        if lb is not None:
            lb.stop()
        members = [p for r in replicas for p in r._group_members()]
        stop_all(replicas)
        assert not [p.pid for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_steer_and_delete_through_the_balancer_reach_the_owner(fleet):
    replicas, lb = fleet

    async def scenario():
        async with GenerationsClient(lb.rest_url) as client:
            async with client.start(LONG) as live:
                owner = live.id.split(".")[0]
                steers, deletes, events = [], [], []
                async for event in live:
                    events.append(event)
                    if event.name == "generation.progress" and not steers:
                        # round robin: within a few calls one lands on the replica not running it
                        while not any(h["X-Ldm-Replica"] != owner for _, h in steers):
                            steers.append(await client.steer(live.id, prompt=f"a blue circle {len(steers)}"))
                            assert len(steers) <= 8
                    seen = {e.data["steer_id"] for e in events if e.name == "generation.steered"}
                    if not deletes and len(seen) == len(steers) > 0:
                        deletes.append(await client.cancel(live.id))
                return owner, steers, deletes, events

    owner, steers, deletes, events = asyncio.run(asyncio.wait_for(scenario(), 240))
    assert owner in {r.name for r in replicas}
    assert [answer["steer_id"] for answer, _ in steers] == list(range(1, len(steers) + 1))
    assert all(headers["X-Ldm-Owner"] == owner for _, headers in steers)
    forwarded = [answer["steer_id"] for answer, headers in steers if headers["X-Ldm-Replica"] != owner]
    assert forwarded, "no steer landed on the other replica"
    steered = [e.data for e in events if e.name == "generation.steered"]
    assert sorted(s["steer_id"] for s in steered) == list(range(1, len(steers) + 1))
    ((answer, headers),) = deletes
    assert answer["status"] == "cancelled" and headers["X-Ldm-Owner"] == owner
    assert events[-1].name == "error" and events[-1].data["error"]["code"] == "cancelled"


def test_ids_of_no_replica_are_404_on_every_replica(fleet):
    replicas, _ = fleet

    async def scenario():
        answers = []
        for replica in replicas:
            async with GenerationsClient(f"http://127.0.0.1:{replica.rest_port}") as client:
                for generation_id in ("replica-9.00", "127.0.0.1:1.00", "Replica-0.00", "evil.example.com.00"):
                    for call in (client.steer(generation_id, prompt="x"), client.cancel(generation_id)):
                        with pytest.raises(GenerationError) as info:
                            await call
                        answers.append((replica.name, info.value.status, info.value.headers.get("X-Ldm-Owner")))
        return answers

    # answered by the replica asked, which sent nothing anywhere
    assert {(status, owner == asked) for asked, status, owner in asyncio.run(scenario())} == {(404, True)}
