"""`ldm bench` end to end on the tiny model (slow: starts three servers)."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_reports_every_target(tiny_checkpoint, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path),
         "--steps", "5", "--requests", "8", "--concurrency", "1,16", "--baseline-runs", "2", "--rss-requests", "120", "--mix-rounds", "1",
         "--rss-steps", "2"],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [t["target"].split(" ")[0] for t in report["targets"]] == ["throughput", "single-request", "p99", "mean", "mixed", "server"]
    # every load level served every request (a run where all failed must not pass)
    assert all(r["completed"] > 0 and not r["errors"] for r in report["runs"]), report["runs"]
    assert (tmp_path / "latency_vs_load.png").stat().st_size > 1000
    assert "| target | measured | required | met |" in done.stdout


def test_steer_bench_measures_every_steer_on_a_real_server(server):
    from serving.bench.steer import measure, targets

    fields = dict(prompt="a red circle", steps=150, guidance_scale=5.0, progress_every=1)
    report = measure(server.grpc_url, fields, {1: 2, 3: 1}, server.control_secret, log=lambda m: None)
    assert [level["concurrency"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["steers"] + level["missed"] == 2 * (level["concurrency"] == 1) + 3 * (level["concurrency"] == 3)
        assert level["steers"] > 0 and level["steps"]["n"] == level["steers"] and level["steps"]["p50"] >= 0
        assert level["text_encoder_calls"] > 0  # steers bring new texts (steers of one iteration share a call)
        assert level["total_s_steered"] > 0 and level["total_s_unsteered"] > 0
    assert len(targets(report)) == 10
