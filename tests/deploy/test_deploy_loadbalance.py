"""Real load balancing on loopback: `ldm serve` replicas (tritonserver + gateway) behind Debian's
nginx (grpc_pass to each replica's gateway, the config in deploy/nginx/ that mirrors the
Kubernetes Ingress), driven with the gateway's typed client through serving.client.retry.

Checks: calls spread over every replica, through nginx and with client-side round robin
(counted by each replica's own nv_inference_request_success, cross-checked with nginx's log);
when one replica is SIGKILLed mid-load, only the calls running on it fail, with the coded
UNAVAILABLE; nginx stops sending to it; calls started afterwards succeed at the first attempt;
the retry policy recovers the failed ones; every process started is gone afterwards.
"""

import json

import pytest

from tests.lb.scenario import ONE_ATTEMPT, run_scenario
from tests.lb.tools import require

N_REPLICAS = 3
# Tiny random checkpoint (32x32 images): a call takes a fraction of a second here, long enough
# for several to be running on the replica that is killed.
GEN = {"steps": 40, "height": 32, "width": 32, "guidance_scale": 5.0}
AFTER_CRASH = 12  # calls started after the crash (the load runs until the crash, then these)
# Three callers per replica, and the crash waits (a few seconds at most) for three calls running
# on the victim: a call may finish in the milliseconds between seeing it and the signal, so
# more than one must be running for the crash to surely hit one.
CONCURRENCY = 3 * N_REPLICAS


@pytest.fixture(scope="module")
def report(tiny_repo, tmp_path_factory) -> dict:
    require("nginx")
    from serving.client.images import ImagesClient

    result = run_scenario(
        tiny_repo,
        tmp_path_factory.mktemp("lb-run"),
        make_client=lambda url: ImagesClient(url, timeout_s=60, policy=ONE_ATTEMPT),
        n_replicas=N_REPLICAS,
        spread_requests=18,
        client_side_requests=12,
        failover_requests=AFTER_CRASH,
        concurrency=CONCURRENCY,
        kill_when_running=3,
        gen_kwargs=GEN,
        ready_timeout_s=150,
        phase_timeout_s=90,
    )
    print("\nload-balancing report:\n" + json.dumps(result, indent=1))
    return result


def test_calls_spread_over_all_replicas(report):
    spread = report["spread"]
    assert spread["finished"] and spread["completed"] == spread["sent"] == 18
    per_replica = spread["per_replica"]
    assert set(per_replica) == set(report["replicas"])
    # Round robin per call: every replica serves a fair part (at least half its equal share).
    assert all(n >= spread["sent"] / (2 * N_REPLICAS) for n in per_replica.values()), per_replica
    assert sum(per_replica.values()) == spread["attempts"]
    assert spread["per_replica_nginx"] == per_replica


def test_client_side_round_robin_spreads_without_a_proxy(report):
    # Option B (headless Service): the client's own channel rotates calls over the replicas.
    cs = report["client_side"]
    assert cs["finished"] and cs["completed"] == cs["sent"] == 12
    assert set(cs["per_replica"]) == set(report["replicas"])
    # Round robin over the sub-connections that are ready; all are after the first calls.
    assert all(n >= 12 / (2 * N_REPLICAS) for n in cs["per_replica"].values()), cs


def test_crash_fails_only_calls_running_on_the_victim(report):
    f = report["failover"]
    assert f["finished"]
    assert f["in_flight_on_victim_at_kill"] > 0, "the crash must hit running calls"
    # Every failed attempt is a call nginx saw die on the victim, with the coded error.
    assert f["failed_attempts"] >= 1
    assert f["failed_attempts"] == f["victim_calls_failed_by_kill"], f
    assert set(f["failed_by_status"]) == {"UNAVAILABLE"}, f["failed_attempt_messages"]
    # At most the calls that can run at once; the survivors' calls never fail.
    assert f["failed_attempts"] <= CONCURRENCY


def test_nginx_stops_sending_to_the_dead_replica(report):
    f = report["failover"]
    assert f["nginx_calls_started_after_kill"] >= AFTER_CRASH
    assert f["nginx_after_kill_served_by_victim"] == 0
    # One failure takes it out for fail_timeout; at most one probe per window afterwards.
    assert f["nginx_after_kill_tried_victim"] <= 1 + int(f["failover_seconds"] // f["nginx_fail_timeout_s"])
    assert sum(v for k, v in f["per_replica"].items() if k != f["victim"] + " (until killed)") > 0


def test_later_calls_succeed_and_retry_recovers_the_failed(report):
    f = report["failover"]
    assert f["started_after_kill"] >= AFTER_CRASH
    assert f["started_after_kill_needing_retry"] == 0
    assert f["completed"] == f["sent"] and f["failed_finally"] == 0
    assert f["retried"] == f["recovered_by_retry"] >= 1
    assert f["attempts"] == f["sent"] + f["failed_attempts"]


def test_no_process_left_behind(report):
    # run_scenario recorded every process it started, by PID, and stopped them all.
    import psutil

    assert len(report["pids"]) > 3 * N_REPLICAS  # launcher + tritonserver (+ stubs) + gateway each, nginx
    alive = []
    for pid in report["pids"]:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, p.cmdline()[:3]))
        except psutil.NoSuchProcess:
            pass
    assert alive == []
