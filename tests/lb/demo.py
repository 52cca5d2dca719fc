"""`python -m tests.lb.demo`: the loopback load-balancing scenario, printed for a person.

Starts N `ldm serve` replicas on free loopback ports behind nginx (deploy/nginx/), sends
generations through nginx with the retrying client, crashes one replica mid-load, and prints
requests sent / completed / failed / retried and each replica's share. Without --repo it
exports the tiny random checkpoint into a temporary folder first (seconds). Everything it
starts is stopped before it exits.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.lb.scenario import run_scenario


def _table(title: str, phase: dict) -> str:
    lines = [
        f"{title}:",
        f"  requests sent {phase['sent']}, completed {phase['completed']}, "
        f"failed attempts {phase['failed_attempts']}"
        + "".join(f" ({k}: {v})" for k, v in phase["failed_by_status"].items())
        + ", "
        f"retried {phase['retried']} (recovered {phase['recovered_by_retry']}), "
        f"failed after retries {phase['failed_finally']}",
        "  per replica (its nv_inference_request_success):",
    ]
    for name, n in phase["per_replica"].items():
        lines.append(f"    {name:<26} {n:>4}  {phase['share'][name]:>6.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lb.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, help="an exported model repository (default: tiny checkpoint)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON too")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (one is crashed)")

    from serving.client.images import ImagesClient
    from tests.lb.scenario import ONE_ATTEMPT

    with tempfile.TemporaryDirectory(prefix="ldm-lb-demo-") as tmp:
        repo = args.repo
        if repo is None:
            from export.repository import write_repository
            from training.tiny_checkpoint import write_tiny_checkpoint

            print("exporting the tiny random checkpoint ...", flush=True)
            write_tiny_checkpoint(Path(tmp) / "checkpoint")
            repo = Path(tmp) / "repo"
            write_repository(Path(tmp) / "checkpoint", repo, log=lambda *a: None)
        report = run_scenario(
            repo,
            Path(tmp) / "run",
            make_client=lambda url: ImagesClient(url, timeout_s=60, policy=ONE_ATTEMPT),
            n_replicas=args.replicas,
            spread_requests=args.requests,
            failover_requests=args.requests,
            client_side_requests=args.requests,
            concurrency=args.concurrency,
            gen_kwargs={"steps": args.steps, "height": args.size, "width": args.size},
            log=lambda m: print(m, flush=True),
        )
    f = report["failover"]
    print()
    print(_table("phase 1, all replicas up, through nginx", report["spread"]))
    print(_table("phase 1b, no proxy, client-side round robin", report["client_side"]))
    print(_table(f"phase 2, {f['victim']} killed (SIGKILL) mid-load", f))
    print(
        f"  calls running on {f['victim']} when it died: {f['victim_calls_failed_by_kill']} failed "
        f"(coded {', '.join(f['failed_by_status']) or '-'}), {f['victim_calls_cut_after_image']} had their image already"
    )
    print(
        f"  calls started after the crash: {f['started_after_kill']}, needing a retry: "
        f"{f['started_after_kill_needing_retry']}; nginx calls that tried {f['victim']} after it died: "
        f"{f['nginx_after_kill_tried_victim']}, served by it: {f['nginx_after_kill_served_by_victim']}"
    )
    if args.json:
        print(json.dumps(report, indent=1))
    ok = (
        report["spread"]["failed_finally"] == 0
        and f["failed_finally"] == 0
        and f["nginx_after_kill_served_by_victim"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
