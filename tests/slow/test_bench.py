"""`ldm bench` end to end on the tiny model (slow: starts three servers)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_reports_every_target(tiny_checkpoint, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "bench",
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(tmp_path),
            "--steps",
            "5",
            "--requests",
            "8",
            "--concurrency",
            "1,16",
            "--baseline-runs",
            "2",
            "--rss-requests",
            "120",
            "--mix-rounds",
            "1",
            "--rss-steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [t["target"].split(" ")[0] for t in report["targets"]] == [
        "throughput",
        "single-request",
        "p99",
        "mean",
        "mixed",
        "server",
    ]
    # every load level served every request (a run where all failed must not pass)
    assert all(r["completed"] > 0 and not r["errors"] for r in report["runs"]), report["runs"]
    assert (tmp_path / "latency_vs_load.png").stat().st_size > 1000
    assert "| target | measured | required | met |" in done.stdout


def test_steer_bench_measures_every_steer_on_a_real_server(server, monkeypatch):
    """The steer bench's report against its definitions, recomputed from the generations it ran
    (recorded by wrapping the bench's own per-generation function)."""
    import numpy as np

    from serving.bench import steer as bench

    runs = []  # (steer_after, what the generation returned), in the order they ended
    real = bench._generation

    def recording(url, fields, seed, steer_after, control_secret):
        out = real(url, fields, seed, steer_after, control_secret)
        runs.append((steer_after, out))
        return out

    monkeypatch.setattr(bench, "_generation", recording)
    fields = dict(prompt="a red circle", steps=150, guidance_scale=5.0, progress_every=1)
    levels = {1: 2, 3: 1}  # concurrency: rounds
    report = bench.measure(server.grpc_url, fields, levels, server.control_secret, log=lambda m: None)
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level, (concurrency, rounds) in zip(report["levels"], levels.items()):
        warm_up, measured = runs[:concurrency], runs[concurrency : concurrency + 2 * rounds * concurrency]
        del runs[: concurrency + 2 * rounds * concurrency]
        assert all(after is None for after, _ in warm_up)
        steered = [out for after, out in measured if after is not None]
        plain = [out for after, out in measured if after is None]
        assert len(steered) == len(plain) == rounds * concurrency
        steers = [out["steer"] for out in steered if "steer" in out]
        assert level["steers"] == len(steers) > 0 and level["missed"] == len(steered) - len(steers)
        for steer, (after, _) in zip(steers, [(a, o) for a, o in measured if a is not None and "steer" in o]):
            # the steer is sent once `after` steps were seen; k - s by definition; k is a step of the run
            assert steer["seen_at_ack"] >= after and steer["steps"] == steer["first_step"] - steer["seen_at_ack"]
            assert 0 <= steer["first_step"] < fields["steps"] and steer["ack_rtt_ms"] > 0
        for key in ("steps", "ms", "ack_rtt_ms"):
            values = np.array([steer[key] for steer in steers], dtype=float)
            got = level[key]
            assert got["n"] == len(steers) and got["p50"] == pytest.approx(np.median(values))
            assert got["p95"] == pytest.approx(np.percentile(values, 95)) and got["max"] == values.max()
            assert got["p50"] <= got["p95"] <= got["max"]
        gaps_ms = [1000 * g for out in plain + steered for g in out["gaps_s"]]
        assert level["step_ms"] == pytest.approx(np.median(gaps_ms)) and level["step_ms"] > 0
        assert level["total_s_steered"] == pytest.approx(np.mean([out["total_s"] for out in steered if "steer" in out]))
        assert level["total_s_unsteered"] == pytest.approx(np.mean([out["total_s"] for out in plain]))
        assert level["cost_ratio"] == pytest.approx(level["total_s_steered"] / level["total_s_unsteered"])
        assert level["target_ms_p50"] == pytest.approx(2 * level["step_ms"] + level["text_encoder_ms"])
        assert level["text_encoder_calls"] > 0  # steers bring new texts (steers of one iteration share a call)
    assert runs == [] and len(bench.targets(report)) == 10
