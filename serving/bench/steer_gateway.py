"""Steer-to-effect latency through the gateway's REST API (the path the page uses): live
generations over `POST /v1/generations` (server-sent events), each steered several times with
`POST /v1/generations/{id}/steer`, at 1 and 16 concurrent generations.

Per steer: ack -> effect, the time from the 202 answer to the `generation.steered` event (that
event rides on the response of the step that first used the steer, so it includes that step),
and the delay in steps: the 0-based index of that step minus the steps the stream had reported
done when the ack came (0: the very next step used it; negative when the effect arrived before
the ack); and the same from sending the steer (`send_to_effect_ms`, `steps_from_send`). A steer is sent `--gap` steps after the
previous one took effect; a generation is cancelled (DELETE) after its last steer. Every steer
has a prompt not used before (`ldm bench --steer`'s, serving/bench/steer.py, which measures the
same at the Triton level), so each costs its text-encoder call.

    ldm serve &    # or any gateway
    python -m serving.bench.steer_gateway --url http://127.0.0.1:8080 --out docs/results/bench/steer-gateway.json
"""

from typing import Any
import argparse
import asyncio
import itertools
import json
import os
from pathlib import Path
import statistics
import time

from serving.bench.bench import PROMPTS
from serving.bench.steer import steered_prompts
from serving.client.generations import GenerationsClient

NEW_PROMPTS = itertools.cycle(list(steered_prompts()))


async def one_generation(client, index: int, args) -> dict:
    samples, step_times, steered = [], [], {}  # steered: steer id -> (time seen, step)
    body = {"prompt": PROMPTS[0], "steps": args.steps, "seed": 1000 + index, "preview_every": 0}
    if args.size:
        body["size"] = f"{args.size}x{args.size}"
    async with client.start(body) as live:
        done, last_progress_at, next_at = 0, None, args.first_at
        pending: dict[str, Any] | None = (
            None  # the steer in flight: {"sent", "task"; once answered "ack", "done_at_ack", "steer_id"}
        )
        async for event in live:
            now = time.monotonic()
            if event.name == "generation.progress":
                done = event.data["step"]
                if last_progress_at is not None:
                    step_times.append(now - last_progress_at)
                last_progress_at = now
            elif event.name == "generation.steered":
                steered[event.data["steer_id"]] = (now, event.data["step"])
            elif event.name in ("generation.completed", "error"):
                break
            if pending and "ack" in pending and pending["steer_id"] in steered:
                effect, step = steered[pending["steer_id"]]
                samples.append(
                    {
                        "ack_to_effect_ms": 1000 * (effect - pending["ack"]),
                        "send_to_effect_ms": 1000 * (effect - pending["sent"]),
                        "delay_steps": step - pending["done_at_ack"],
                        "steer_id": pending["steer_id"],
                        "done_at_send": pending["done_at_send"],
                        "done_at_ack": pending["done_at_ack"],
                        "step": step,
                    }
                )
                pending, next_at = None, done + args.gap
                if len(samples) == args.steers:
                    await client.cancel(live.id)
            if pending is None and len(samples) < args.steers and done >= next_at:
                pending = {"sent": time.monotonic(), "done_at_send": done}
                pending["task"] = asyncio.create_task(_steer(client, live.id, next(NEW_PROMPTS), pending, lambda: done))  # noqa: B023 (read later: the count then)
    return {"samples": samples, "step_s": statistics.median(step_times) if step_times else None}


async def _steer(client, generation_id, prompt, pending, steps_done):
    answer, _ = await client.steer(generation_id, prompt=prompt)
    pending["ack"], pending["done_at_ack"], pending["steer_id"] = time.monotonic(), steps_done(), answer["steer_id"]


def summary(values: list) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(ordered), "p50": pick(0.5), "p95": pick(0.95), "max": ordered[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway's REST URL")
    parser.add_argument("--concurrency", default="1,16", help="concurrent live generations (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=150, help="denoising steps per generation (default: %(default)s)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--steers", type=int, default=4, help="steers per generation (default: %(default)s)")
    parser.add_argument(
        "--first-at", type=int, default=3, help="first steer after this many steps (default: %(default)s)"
    )
    parser.add_argument("--gap", type=int, default=8, help="steps between a steer's effect and the next steer")
    parser.add_argument("--rounds", type=int, default=8, help="at concurrency 1: generations one after another")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    report = {
        "url": args.url,
        "steps": args.steps,
        "steers_per_generation": args.steers,
        "gap_steps": args.gap,
        "load_average_1m_at_start": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "levels": [],
    }
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        results = asyncio.run(_sequential(args) if concurrency == 1 else _concurrent(args, concurrency))
        report["levels"].append({**_level_report(concurrency, results), "load_average_1m_after": os.getloadavg()[0]})
        print(json.dumps({k: v for k, v in report["levels"][-1].items() if k != "samples"}), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


async def _sequential(args) -> list:
    async with GenerationsClient(args.url) as client:
        return [await one_generation(client, i, args) for i in range(args.rounds)]


async def _concurrent(args, concurrency: int) -> list:
    async with GenerationsClient(args.url) as client:
        return await asyncio.gather(*(one_generation(client, i, args) for i in range(concurrency)))


def _level_report(concurrency: int, results: list) -> dict:
    samples = [s for r in results for s in r["samples"]]
    return {
        "concurrency": concurrency,
        "generations": len(results),
        "steers": len(samples),
        "ack_to_effect_ms": summary([s["ack_to_effect_ms"] for s in samples]),
        "send_to_effect_ms": summary([s["send_to_effect_ms"] for s in samples]),
        "delay_steps": summary([s["delay_steps"] for s in samples]),
        "steps_from_send": summary([s["step"] - s["done_at_send"] for s in samples]),
        "step_ms_median": 1000 * statistics.median(r["step_s"] for r in results if r["step_s"]),
        "samples": samples,
    }


if __name__ == "__main__":
    raise SystemExit(main())
