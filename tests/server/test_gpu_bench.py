"""scripts/gpu_bench.sh's program on CPU: `--device cpu --small` runs the code path the GPU run
takes (checkpoint, diffusers baseline, UNet ceiling, export, tritonserver with the torch runner,
closed and open loops, targets) on the tiny checkpoint; only the GPU itself is not exercised."""

import json

import pytest

from serving.bench.gpu import main


def test_small_cpu_run_fills_every_stage(tmp_path, monkeypatch):
    import time

    from diffusers import StableDiffusionPipeline

    calls = []  # seconds inside each diffusers pipeline call the bench times
    real_call = StableDiffusionPipeline.__call__

    def timed_call(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return real_call(self, *args, **kwargs)
        finally:
            calls.append(time.perf_counter() - start)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", timed_call)
    assert main(["--device", "cpu", "--small", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    data = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    stages = data["stages"]
    assert stages["environment"]["device"] == "cpu" and stages["checkpoint"]["size"] == 32
    # diffusers one at a time: a warm-up call, then the small run's one timed call, whose time
    # (measured around it by the bench: at least the call's own, plus returning) is latency_s
    diffusers = stages["diffusers"]
    assert diffusers["runs"] == 1 and len(calls) == 2
    assert calls[1] <= diffusers["latency_s"] <= calls[1] + 0.25
    assert diffusers["throughput"] == pytest.approx(1 / diffusers["latency_s"])
    assert set(stages["unet_ceiling"]["levels"]) == {"1", "4"}
    steps, max_active = data["arguments"]["steps"], data["arguments"]["max_active"]
    for clients, level in stages["unet_ceiling"]["levels"].items():
        assert level["rows"] == 2 * min(int(clients), max_active) and level["ms_per_step"] > 0
        assert level["ceiling_images_per_s"] == pytest.approx(int(clients) / (steps * level["ms_per_step"] / 1e3))
    assert stages["unet_ceiling"]["levels"]["4"]["rows"] == 8
    server = stages["server"]
    assert server["path"].startswith("tritonserver") and server["row_cap"] == 8
    assert set(server["closed"]) == {"1", "4"} and server["unloaded"]["completed"] == 4
    assert all(run["errors"] == {} and run["completed"] > 0 for run in server["closed"].values())
    assert server["poisson_80"]["completed"] >= 8 and server["poisson_80"]["errors"] == {}
    # every request the bench sends ends in an image: the counts are its definitions' (--small)
    waves, poisson = data["arguments"]["waves"], server["poisson_80"]
    assert [run["completed"] for run in server["closed"].values()] == [max(waves * c, 4) for c in (1, 4)]
    assert poisson["completed"] == max(8, int(poisson["rate"] * 2))
    best = max(run["throughput_images_per_s"] for run in server["closed"].values())
    assert poisson["rate"] == pytest.approx(0.8 * best) and poisson["offered"] == poisson["rate"]
    for run in [server["unloaded"], *server["closed"].values(), poisson]:
        assert 0 < run["latency_p50_s"] <= run["latency_p95_s"] <= run["latency_p99_s"]
    targets = {row["target"]: row for row in data["targets"]}
    assert targets["batch-1 end-to-end latency (s)"]["measured"] == server["unloaded"]["latency_p50_s"]
    assert targets["throughput at C=32 (img/s)"]["measured"] is None  # C=32 is not part of the small run
    assert data["skipped"] == []


def test_engine_without_triton_serves_the_load_generator(tiny_checkpoint, tmp_path):
    """The bench's fallback where tritonserver cannot start: the same pipeline service, in process."""
    from export.cli import pipeline_parameters
    from export.repository import write_repository
    from serving.bench.inprocess import InProcessPipeline
    from serving.bench.loadgen import closed_loop

    repo = tmp_path / "repo"
    write_repository(
        tiny_checkpoint,
        repo,
        pipeline_parameters=pipeline_parameters(unet="torch", text_vae="torch"),
        log=lambda *a: None,
    )
    pipeline = InProcessPipeline(repo, "cpu", log=lambda *a: None)
    try:
        run = closed_loop(pipeline.client, {"prompt": "a red circle", "steps": 3}, 3, 6).summary()
        bad = closed_loop(pipeline.client, {"prompt": "a red circle", "steps": 0}, 1, 1).summary()
    finally:
        pipeline.stop()
    assert run["completed"] == 6 and run["errors"] == {}
    assert bad["completed"] == 0 and bad["errors"] == {"INVALID_ARG": 1}
    assert pipeline.service.engine.stats.row_cap == 32
