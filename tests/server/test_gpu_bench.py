"""scripts/gpu_bench.sh's program on CPU: `--device cpu --small` runs the code path the GPU run
takes (checkpoint, diffusers baseline, UNet ceiling, export, tritonserver with the torch runner,
closed and open loops, targets) on the tiny checkpoint; only the GPU itself is not exercised."""
import json

from serving.bench.gpu import main


def test_small_cpu_run_fills_every_stage(tmp_path):
    assert main(["--device", "cpu", "--small", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    data = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    stages = data["stages"]
    assert stages["environment"]["device"] == "cpu" and stages["checkpoint"]["size"] == 32
    assert stages["diffusers"]["latency_s"] > 0
    assert set(stages["unet_ceiling"]["levels"]) == {"1", "4"}
    assert stages["unet_ceiling"]["levels"]["4"]["rows"] == 8
    server = stages["server"]
    assert server["path"].startswith("tritonserver") and server["row_cap"] == 8
    assert set(server["closed"]) == {"1", "4"} and server["unloaded"]["completed"] == 4
    assert all(run["errors"] == {} and run["completed"] > 0 for run in server["closed"].values())
    assert server["poisson_80"]["completed"] >= 8 and server["poisson_80"]["errors"] == {}
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
    write_repository(tiny_checkpoint, repo, pipeline_parameters=pipeline_parameters(unet="torch", text_vae="torch"),
                     log=lambda *a: None)
    pipeline = InProcessPipeline(repo, "cpu", log=lambda *a: None)
    try:
        run = closed_loop(pipeline.client, {"prompt": "a red circle", "steps": 3}, 3, 6).summary()
        bad = closed_loop(pipeline.client, {"prompt": "a red circle", "steps": 0}, 1, 1).summary()
    finally:
        pipeline.stop()
    assert run["completed"] == 6 and run["errors"] == {}
    assert bad["completed"] == 0 and bad["errors"] == {"INVALID_ARG": 1}
    assert pipeline.service.engine.stats.row_cap == 32
