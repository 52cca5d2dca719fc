"""The loopback load-balancing scenario: replicas behind nginx, load spread, one replica
crashed mid-load. Returns a report (dict) that tests/deploy/test_deploy_loadbalance.py asserts on
and `python -m tests.lb.demo` prints. Calls go to each replica's gateway (ldm.v1.Images).

Counts per replica come from each replica's own Triton metric
nv_inference_request_success{model="pipeline"}; nginx's access log says where each call went
after the crash (a dead replica has no metrics to ask).
"""

import time
from pathlib import Path

import psutil

from serving.client.retry import RetryPolicy
from tests.lb.load import LoadRun, summarize
from tests.lb.nginx import FAIL_TIMEOUT_S, NginxGrpcLB
from tests.lb.replicas import Replica, start_replicas, stop_all

# the engine's own counts (Triton's request counters also count the gateway's status messages,
# one a second per replica): images served, and what it has accepted (ended in any way, running
# or queued); exported every 0.5 s
SERVED = "ldm_images_completed_total"
ACCEPTED = (
    "ldm_images_completed_total",
    "ldm_cancellations_total",
    "ldm_failures_total",
    "ldm_deadline_expirations_total",
    "ldm_active_requests",
    "ldm_queue_length",
)


def _accepted(replica: Replica) -> int:
    return int(sum(replica.metric(name) or 0.0 for name in ACCEPTED))


# the gateway's gRPC methods, as nginx logs their URIs
CALLS = ("/ldm.v1.Images/Generate", "/ldm.v1.Images/GenerateStream")
# the scenario retries itself (and counts the attempts): the client must not retry on its own
ONE_ATTEMPT = RetryPolicy(max_attempts=1)


def _counts(replicas: list[Replica], expected_total: int | None = None, timeout_s: float = 10) -> dict:
    """Per-replica success counters; waits (bounded) until they add up to expected_total."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = {r.name: r.metric(SERVED) or 0.0 for r in replicas}
        if expected_total is None or sum(counts.values()) >= expected_total or time.monotonic() > deadline:
            return {k: int(v) for k, v in counts.items()}
        time.sleep(0.2)


def _nginx_split(lb: NginxGrpcLB, replicas: list[Replica], since: float, expected: int, timeout_s: float = 5) -> dict:
    """Calls per replica as nginx logged them (by the replica that finally served each call);
    waits (bounded) for the last lines, which nginx writes just after the client has its answer."""
    by_addr = {r.grpc_addr: r.name for r in replicas}
    deadline = time.monotonic() + timeout_s
    while True:
        split = {r.name: 0 for r in replicas}
        for e in lb.log_entries():
            if e["t"] >= since and e["upstreams"] and e["uri"].endswith(CALLS):
                split[by_addr[e["upstreams"][-1]]] += 1
        if sum(split.values()) >= expected or time.monotonic() > deadline:
            return split
        time.sleep(0.05)


def _in_flight(replica: Replica, received_before: int, lb: NginxGrpcLB, since: float) -> int:
    """Calls running on `replica` now: what its engine accepted (ended, running or
    queued) minus the calls nginx has logged as ended
    there (a log line is written when a call ends). The log is read first and the counter
    last, so the estimate is as fresh as possible when the caller acts on it."""
    ended = sum(1 for e in lb.log_entries() if e["t"] >= since and e["upstreams"][-1:] == [replica.grpc_addr])
    received = _accepted(replica) - received_before
    return received - ended


def _wait_for_victim_busy(
    run: LoadRun,
    victim: Replica,
    received_before: int,
    lb: NginxGrpcLB,
    since: float,
    min_completed: int,
    timeout_s: float,
    want: int = 2,
    want_for_s: float = 8.0,
) -> int:
    """Wait until the load is under way and calls are running on the victim; returns how many
    (0 if the deadline passed first). For `want_for_s` it holds out for `want` running calls,
    so that the crash still hits one if another ends in the milliseconds before the signal;
    then one is enough. The load keeps going meanwhile (its cap is far above this wait)."""
    start = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if run.completed() >= min_completed:
            start = start or time.monotonic()
            n = _in_flight(victim, received_before, lb, since)
            if n >= want or (n > 0 and time.monotonic() - start > want_for_s):
                return n
        time.sleep(0.005)
    return 0


def run_scenario(
    repo: Path,
    workdir: Path,
    make_client,
    n_replicas: int = 2,
    spread_requests: int = 12,
    failover_requests: int = 12,
    concurrency: int = 4,
    gen_kwargs: dict | None = None,
    policy: RetryPolicy = RetryPolicy(),
    ready_timeout_s: float = 120,
    client_side_requests: int = 0,
    kill_when_running: int = 2,
    phase_timeout_s: float = 120,
    log=print,
) -> dict:
    gen_kwargs = gen_kwargs or {}
    workdir = Path(workdir)
    replicas: list[Replica] = []
    lb = None
    try:
        t0 = time.monotonic()
        replicas = start_replicas(n_replicas, Path(repo), workdir / "replicas", ready_timeout_s)
        lb = NginxGrpcLB(workdir / "nginx", [r.grpc_port for r in replicas]).start()
        log(
            f"{n_replicas} replicas ready behind nginx at {lb.url} in {time.monotonic() - t0:.1f}s: "
            + ", ".join(f"{r.name}=grpc:{r.grpc_port}/metrics:{r.metrics_port}" for r in replicas)
        )
        make = lambda: make_client(lb.url)  # noqa: E731

        # Phase 1: spread. Every call goes through nginx; each replica counts what it served.
        before = _counts(replicas)
        spread_start = time.time()
        spread = LoadRun(make, spread_requests, concurrency, gen_kwargs, policy).start()
        finished = spread.join(phase_timeout_s)
        spread_summary = summarize(spread.records)
        after = _counts(replicas, before_total(before) + spread_summary["completed"])
        per_replica = {name: after[name] - before[name] for name in after}
        per_replica_nginx = _nginx_split(lb, replicas, spread_start, spread_summary["attempts"])
        log(f"spread: {spread_summary} per replica {per_replica}")

        # Phase 1b: no proxy, client-side round robin over the replicas (headless Service).
        client_side = None
        if client_side_requests:
            from serving.client.balancing import loopback_target, round_robin_client

            target = loopback_target([r.grpc_addr for r in replicas])
            before = _counts(replicas)
            # One caller, one channel: its rotation is what is observed (each caller's channel
            # rotates on its own, from its own starting replica).
            run = LoadRun(
                lambda: round_robin_client(target, timeout_s=60, policy=ONE_ATTEMPT),
                client_side_requests,
                1,
                gen_kwargs,
                policy,
            ).start()
            cs_finished = run.join(phase_timeout_s)
            cs_summary = summarize(run.records)
            after = _counts(replicas, before_total(before) + cs_summary["attempts"])
            cs_per_replica = {name: after[name] - before[name] for name in after}
            client_side = {
                "finished": cs_finished,
                "target": target,
                **cs_summary,
                "per_replica": cs_per_replica,
                "share": _shares(cs_per_replica),
            }
            log(f"client-side round robin: {cs_summary} per replica {cs_per_replica}")

        # Phase 2: crash one replica while calls are running on it.
        victim, survivors = replicas[-1], replicas[:-1]
        before = _counts(replicas)
        phase_start = time.time()
        # Runs until the crash (bounded by a generous cap), then exactly `failover_requests`
        # more start: the crash always lands mid-load, with calls before and after it.
        failover = LoadRun(make, 50 * failover_requests, concurrency, gen_kwargs, policy).start()
        accepted_before = _accepted(victim)
        victim_busy = _wait_for_victim_busy(
            failover,
            victim,
            accepted_before,
            lb,
            phase_start,
            min_completed=2 * concurrency,
            timeout_s=phase_timeout_s / 4,
            want=kill_when_running,
        )
        victim_before_kill = _accepted(victim) - accepted_before
        kill_wall = time.time()
        kill_done_wall = victim.crash()
        failover.stop_after(failover_requests)
        log(f"crashed {victim.name} (SIGKILL to all its processes) with {victim_busy} call(s) running on it")
        failover_finished = failover.join(phase_timeout_s)
        failover_summary = summarize(failover.records)
        survivor_after = _counts(
            survivors, sum(before[s.name] for s in survivors) + failover_summary["completed"] - victim_before_kill
        )
        failover_per_replica = {s.name: survivor_after[s.name] - before[s.name] for s in survivors}
        failover_per_replica[victim.name + " (until killed)"] = victim_before_kill

        # Where nginx sent calls after the crash (log lines are written when a call ends).
        victim_addr = victim.grpc_addr
        entries = [e for e in lb.log_entries() if e["uri"].endswith(CALLS)]
        # Calls nginx received after the victim was dead (their lines say where they went).
        after_kill = [e for e in entries if e["start"] >= kill_done_wall]
        # Calls that were running on the victim when it died: nginx logs them as 502 (the victim
        # died before answering), as 200 with a non-zero grpc-status (the SIGKILLs go out one
        # process at a time: a gateway that outlived its tritonserver by milliseconds answered
        # the broken Triton stream with UNAVAILABLE), or as 200 without a grpc-status (the image
        # had been streamed, only the call's trailer was lost: the client already has its result).
        on_victim_at_kill = [
            e
            for e in entries
            if e["t"] >= kill_wall
            and e["upstreams"][:1] == [victim_addr]
            and (e["status"] != "200" or e["grpc"] != "0")
        ]
        cut_after_image = [e for e in on_victim_at_kill if e["status"] == "200" and e["grpc"] == ""]
        started_after_kill = [r for r in failover.records if r.started >= kill_done_wall]
        report = {
            "replicas": [r.name for r in replicas],
            # Every process started (launchers, tritonservers, stubs, nginx): all must be gone
            # once run_scenario returns.
            "pids": sorted(
                {p.pid for r in replicas for p in r._group_members()}
                | {lb.proc.pid}
                | {p.pid for p in psutil.Process(lb.proc.pid).children()}
            ),
            "client_side": client_side,
            "spread": {
                "finished": finished,
                **spread_summary,
                "per_replica_nginx": per_replica_nginx,
                "failed_attempt_messages": [m for r in spread.records for m in r.messages],
                "per_replica": per_replica,
                "share": _shares(per_replica),
            },
            "failover": {
                "finished": failover_finished,
                **failover_summary,
                "victim": victim.name,
                "in_flight_on_victim_at_kill": victim_busy,
                "per_replica": failover_per_replica,
                "share": _shares(failover_per_replica),
                "failed_requests_first_attempt_before_kill": sum(
                    1 for r in failover.records if r.attempts > 1 and r.started < kill_wall
                ),
                "started_after_kill": len(started_after_kill),
                "started_after_kill_needing_retry": sum(r.attempts > 1 for r in started_after_kill),
                "victim_calls_failed_by_kill": len(on_victim_at_kill) - len(cut_after_image),
                "victim_calls_cut_after_image": len(cut_after_image),
                "nginx_calls_started_after_kill": len(after_kill),
                "nginx_after_kill_tried_victim": sum(victim_addr in e["upstreams"] for e in after_kill),
                "nginx_after_kill_served_by_victim": sum(
                    e["upstreams"][-1:] == [victim_addr] and e["status"] == "200" and e["grpc"] in ("", "0")
                    for e in after_kill
                ),
                "nginx_fail_timeout_s": FAIL_TIMEOUT_S,
                "failover_seconds": round(time.time() - kill_wall, 2),
                "failed_attempt_messages": [m for r in failover.records for m in r.messages],
            },
        }
        return report
    finally:
        if lb is not None:
            lb.stop()
        stop_all(replicas)


def before_total(counts: dict) -> int:
    return sum(counts.values())


def _shares(per_replica: dict) -> dict:
    total = sum(per_replica.values()) or 1
    return {k: round(v / total, 3) for k, v in per_replica.items()}
