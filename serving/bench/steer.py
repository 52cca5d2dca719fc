"""`ldm bench --steer`: how fast a steer takes effect, and what steering costs, against a real
tritonserver on the default model (gRPC streaming, serving/client/kserve.py).

At 1 and 16 concurrent generations (25 steps, progress every step), each generation is steered
once (a new prompt) after a few streamed steps, by its own steering client. Per steer:
- steps: k - s, where k is the 0-based index of the first step that used the steer (its
  `steer_applied` response) and s the steps the client had seen when the steer's answer (ack)
  came: 0 = the step right after the last one seen used it, 1 = one more step ran in between;
- ms: from the ack to the arrival of the response of step k (the effect visible to the client).
The engine encodes a steer at its next iteration, so a steer waits for the step in flight, one
text-encoder call, then runs in step k: ack to the *start* of step k is at most one step plus one
text-encoder call, and the client sees the effect one step later. The step time (median gap
between step responses of the same runs) and the text encoder's time per call (Triton's own
statistics of the `text_encoder` model over the runs) state those targets in ms.
Cost: total time of steered generations over unsteered ones, rounds alternating at each level.
"""

from concurrent.futures import ThreadPoolExecutor
import itertools
import json
import os
from pathlib import Path
import threading
import time
import uuid

import numpy as np

from serving.bench.bench import PROMPTS


def steered_prompts():
    """Distinct prompts inside the default model's grammar, one per steer: each is new to the
    server's text-embedding cache, so every steer costs its text-encoder call."""
    for size, colour, shape, side, background in itertools.product(
        ("small", "large"),
        ("red", "green", "blue", "yellow", "magenta", "cyan"),
        ("circle", "square", "triangle"),
        ("left", "right"),
        ("black", "white", "grey"),
    ):
        yield f"a {size} {colour} {shape} on the {side} of a {background} background"


STEERED_PROMPTS = itertools.cycle(list(steered_prompts()))
_NEXT_PROMPT = threading.Lock()


def _next_prompt() -> str:
    with _NEXT_PROMPT:
        return next(STEERED_PROMPTS)


def _generation(url, fields, seed, steer_after, control_secret):
    """One streamed generation, steered once after `steer_after` steps when that is not None.
    Returns {total_s, arrivals (per step count), steer: {...}} ."""
    from tritonclient.utils import InferenceServerException

    from serving.client.kserve import LdmClient

    request_id = f"bench-{uuid.uuid4().hex}"
    arrivals, seen, reached, record = {}, [0], threading.Event(), {}  # seen[0]: steps streamed so far

    def on_progress(generation):
        if generation.progress:
            step = generation.progress[-1][0]
            arrivals.setdefault(step, time.perf_counter())
            seen[0] = step
            if steer_after is not None and step >= steer_after:
                reached.set()

    def steer():
        if not reached.wait(60):
            return
        prompt = _next_prompt()
        sent = time.perf_counter()
        try:
            record["steer_id"] = steerer_client.steer(request_id, prompt=prompt)
        except InferenceServerException as exc:  # it finished first: counted as missed
            if exc.status() != "FAILED_PRECONDITION":
                raise
            return
        record["ack"] = time.perf_counter()
        record["ack_rtt_s"] = record["ack"] - sent
        record["seen_at_ack"] = seen[0]

    steerer = threading.Thread(target=steer) if steer_after is not None else None
    if steerer:  # connected before the generation starts: a steer's cost is the steer alone
        steerer_client = LdmClient(url, control_secret=control_secret)
        steerer_client.open_steering()
    with LdmClient(url) as client:
        if steerer:
            steerer.start()
        start = time.perf_counter()
        generation = client.run(
            fields["prompt"],
            on_progress=on_progress,
            request_id=request_id,
            seed=seed,
            **{k: v for k, v in fields.items() if k != "prompt"},
        )
        total = time.perf_counter() - start
    if steerer:
        reached.set()  # a generation that ended before its trigger step releases its steerer
        steerer.join()
        steerer_client.close()
    out = {"total_s": total, "gaps_s": _gaps(arrivals, fields["steps"])}
    if steer_after is not None and "steer_id" in record:
        ((steer_id, first_step),) = generation.steered
        assert steer_id == record["steer_id"]
        out["steer"] = {
            "first_step": first_step,
            "seen_at_ack": record["seen_at_ack"],
            "steps": first_step - record["seen_at_ack"],
            "ms": 1000 * (arrivals[first_step + 1] - record["ack"]),
            "ack_rtt_ms": 1000 * record["ack_rtt_s"],
        }
    return out


def _gaps(arrivals: dict, steps: int) -> list:
    """Seconds between consecutive step responses (steady steps only: not the first, not the last)."""
    return [arrivals[s + 1] - arrivals[s] for s in range(2, steps - 1) if s in arrivals and s + 1 in arrivals]


def _round(url, fields, concurrency, steered: bool, round_index: int, control_secret: str) -> list:
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [
            pool.submit(
                _generation,
                url,
                fields,
                1000 * round_index + i,
                (4 + (3 * i + round_index) % 14) if steered else None,
                control_secret,
            )
            for i in range(concurrency)
        ]
        return [f.result() for f in futures]


def _text_encoder_stats(url) -> tuple:
    """(calls, seconds) the `text_encoder` model has served so far (Triton's statistics)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics("text_encoder", as_json=True)["model_stats"][0]
    finally:
        client.close()
    success = stats["inference_stats"]["success"]
    return int(success.get("count", 0)), int(success.get("ns", 0)) / 1e9


def _percentiles(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
        "n": int(values.size),
    }


def measure(url, fields, levels: dict, control_secret: str, log=print) -> dict:
    """levels: {concurrency: rounds}. Steered and unsteered rounds alternate; steers carry
    `control_secret` (they go to Triton's port, as the operator)."""
    report = {"levels": []}
    for concurrency, rounds in levels.items():
        _round(url, fields, concurrency, False, 99, control_secret)  # warm-up at this level
        calls0, seconds0 = _text_encoder_stats(url)
        steered, plain = [], []  # generations
        for r in range(rounds):  # alternating which goes first, so drifting load weighs on both
            for kind in (False, True) if r % 2 == 0 else (True, False):
                (steered if kind else plain).extend(_round(url, fields, concurrency, kind, r, control_secret))
        calls1, seconds1 = _text_encoder_stats(url)
        encode_ms = 1000 * (seconds1 - seconds0) / max(calls1 - calls0, 1)
        gaps_ms = _percentiles([1000 * g for run in plain + steered for g in run["gaps_s"]])
        step_ms = gaps_ms["p50"]
        missed = sum("steer" not in g for g in steered)
        steered = [g for g in steered if "steer" in g]
        level = {
            "concurrency": concurrency,
            "generation_steps": fields["steps"],
            "steers": len(steered),
            "missed": missed,
            "steps": _percentiles([g["steer"]["steps"] for g in steered]),
            "ms": _percentiles([g["steer"]["ms"] for g in steered]),
            "ack_rtt_ms": _percentiles([g["steer"]["ack_rtt_ms"] for g in steered]),
            "step_ms": step_ms,
            "step_ms_percentiles": gaps_ms,
            "text_encoder_ms": encode_ms,
            "text_encoder_calls": calls1 - calls0,
            "load_average": os.getloadavg()[0],
            "total_s_steered": float(np.mean([g["total_s"] for g in steered])),
            "total_s_unsteered": float(np.mean([g["total_s"] for g in plain])),
        }
        level["cost_ratio"] = level["total_s_steered"] / level["total_s_unsteered"]
        # what a steer adds to the server's work: its text-encoder call, on the engine's thread
        level["encoder_share_of_generation"] = encode_ms / (fields["steps"] * step_ms)
        level["target_ms_p50"] = 2 * step_ms + encode_ms
        level["target_ms_p95"] = 2 * gaps_ms["p95"] + encode_ms
        report["levels"].append(level)
        log(
            f"  C={concurrency}: {len(steered)} steers ({missed} came after the end); steps late p50 {level['steps']['p50']:.0f} p95 "
            f"{level['steps']['p95']:.0f}; ack->effect p50 {level['ms']['p50']:.1f} ms p95 {level['ms']['p95']:.1f} ms; "
            f"step p50 {step_ms:.1f} ms p95 {gaps_ms['p95']:.1f} ms, text encoder {encode_ms:.1f} ms/call; "
            f"total time steered/unsteered {level['cost_ratio']:.3f}; machine load average {level['load_average']:.1f}"
        )
    return report


def targets(report) -> list:
    rows = []
    for level in report["levels"]:
        c = level["concurrency"]
        rows.append(
            (
                f"C={c}: steps between the ack and the first step that used the steer, p95",
                level["steps"]["p95"],
                "<= 1",
                level["steps"]["p95"] <= 1,
            )
        )
        for q in ("p50", "p95"):
            step = level["step_ms"] if q == "p50" else level["step_ms_percentiles"]["p95"]
            rows.append(
                (
                    f"C={c}: ack -> response of that step, ms, {q} (<= 1 step + 1 text-encoder call to its start, then "
                    f"the step: 2 x {step:.1f} (step {q}) + {level['text_encoder_ms']:.1f} ms)",
                    level["ms"][q],
                    f"<= {level[f'target_ms_{q}']:.1f}",
                    level["ms"][q] <= level[f"target_ms_{q}"],
                )
            )
        rows.append(
            (
                f"C={c}: total time, steered / unsteered generation (wall clock, this machine's load)",
                level["cost_ratio"],
                "(measured)",
                True,
            )
        )
        rows.append(
            (
                f"C={c}: work a steer adds: one text-encoder call / the generation's {level['generation_steps']} steps",
                level["encoder_share_of_generation"],
                "(measured)",
                True,
            )
        )
    return [{"target": t, "measured": float(f"{v:.4g}"), "required": req, "met": bool(ok)} for t, v, req, ok in rows]


def run_steer(args, checkpoint, out: Path) -> int:
    from families.checkpoint import CheckpointInfo
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.bench.bench import print_targets
    from serving.triton.server import TritonServer

    size = args.size or CheckpointInfo.read(checkpoint).native_size
    fields = dict(
        prompt=PROMPTS[0], steps=args.steps, guidance_scale=args.guidance, height=size, width=size, progress_every=1
    )
    lines = []

    def log(message):
        print(message, flush=True)
        lines.append(message)

    log(
        f"bench --steer: {checkpoint}, {size}x{size}, {args.steps} steps, guidance {args.guidance}, unet {args.unet}, "
        f"max_active {args.max_active}; each steer sets a new prompt ({next(steered_prompts())!r}, ...)"
    )
    repo = out / "repo-steer"
    write_repository(
        checkpoint,
        repo,
        pipeline_parameters=pipeline_parameters(
            unet=args.unet, max_active=args.max_active, max_rows=2 * args.max_active, max_queue=256
        ),
        log=lambda *a: None,
    )
    levels = {1: args.steer_rounds * 8, 16: args.steer_rounds}
    with TritonServer(repo, log_file=out / "tritonserver-steer.log") as server:
        report = {
            "checkpoint": str(checkpoint),
            "steps": args.steps,
            "guidance": args.guidance,
            "size": size,
            "unet": args.unet,
            "max_active": args.max_active,
            **measure(server.grpc_url, fields, levels, server.control_secret, log),
        }
    report["targets"] = targets(report)
    print_targets(report["targets"])
    lines += ["", "| target | measured | required | met |", "|---|---|---|---|"]
    lines += [
        f"| {r['target']} | {r['measured']} | {r['required']} | {'yes' if r['met'] else 'NO'} |"
        for r in report["targets"]
    ]
    (out / "steer.json").write_text(json.dumps(report, indent=1))
    (out / "steer.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'steer.json'} and {out / 'steer.txt'}")
    return 0
