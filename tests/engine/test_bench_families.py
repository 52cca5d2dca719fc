"""`ldm bench` per family (issue 19 part 6): the baselines are the family's (diffusers pipeline
class, text encoding, per-row inputs) and the report's numbers are what their definitions say.
No wall-clock value is asserted; the end-to-end run is slow (it starts a tritonserver)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from export.cli import pipeline_parameters

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def sdxl_checkpoint(tmp_path_factory):
    from training.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("bench-sdxl") / "tiny-sdxl", kind="sdxl")


@pytest.fixture(scope="module")
def sdxl_repo(tmp_path_factory, sdxl_checkpoint):
    from export.repository import write_repository

    repo = tmp_path_factory.mktemp("bench-sdxl-repo") / "model_repository"
    write_repository(
        sdxl_checkpoint, repo, pipeline_parameters=pipeline_parameters(unet="inprocess"), log=lambda *a: None
    )
    return repo


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_bare_loop_draws_the_family_pipelines_image(family, request):
    """(c) does the work (a) does: given the same starting latents, the bare loop's image is the
    image of the family's diffusers pipeline, as the baselines load it."""
    import torch

    from serving.bench.baselines import BareLoop, diffusers_pipeline_class, load_diffusers_pipeline
    from serving.core.sampler import noise_generator

    checkpoint = request.getfixturevalue("tiny_checkpoint" if family == "sd" else "sdxl_checkpoint")
    repo = request.getfixturevalue("tiny_repo" if family == "sd" else "sdxl_repo")
    expected = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}[family]
    assert diffusers_pipeline_class(checkpoint) == expected
    pipe = load_diffusers_pipeline(checkpoint)
    assert type(pipe).__name__ == expected
    bare = BareLoop(repo)
    assert bare.spec.family == family
    for guidance in (1.0, 5.0):
        image = bare.generate(PROMPT, 3, 6, guidance, 32)
        latents = torch.from_numpy(noise_generator(3).standard_normal((1, 4, 8, 8), dtype=np.float32))
        reference = pipe(
            PROMPT,
            num_inference_steps=6,
            guidance_scale=guidance,
            height=32,
            width=32,
            latents=latents,
            output_type="np",
        ).images[0]
        reference = (np.clip(reference, 0, 1) * 255).round().astype(np.uint8)
        assert np.abs(image.astype(int) - reference).mean() <= 1.0, (family, guidance)


def test_sdxl_bare_loop_conditioning_zero_negative_and_time_ids(sdxl_repo):
    """SDXL's text: prompt_embeds as the context and text_embeds per row, zeros for the empty
    negative prompt (force_zeros_for_empty_prompt); time_ids (size, crop, size) per row."""
    from serving.bench.baselines import BareLoop

    bare = BareLoop(sdxl_repo)
    inputs = bare.conditioning(PROMPT)
    assert set(inputs) == {"encoder_hidden_states", "text_embeds"}
    assert inputs["encoder_hidden_states"].shape == (2, 16, 64) and inputs["text_embeds"].shape == (2, 16)
    assert not inputs["text_embeds"][1].any() and not inputs["encoder_hidden_states"][1].any()
    assert inputs["text_embeds"][0].any()
    from types import SimpleNamespace

    ids = bare.family.row_inputs(SimpleNamespace(height=32, width=32, family_fields={}), "base")["time_ids"]
    assert ids.tolist() == [32, 32, 0, 0, 32, 32]


def _report(c16_throughput=12.0, diffusers_latency=0.5):
    run = {"server": "batched", "mode": "closed", "latency_p50_s": 0.1}
    return {
        "family": "sdxl",
        "diffusers_pipeline": "StableDiffusionXLPipeline",
        "a_diffusers_latency_s": diffusers_latency,
        "a_diffusers_throughput": 1 / diffusers_latency,
        "c_bare_onnx_latency_s": 0.08,
        "unloaded_latency_s": 0.09,
        "baseline_unet_rows_per_call": 2,
        "runs": [
            {**run, "offered": 1, "throughput_images_per_s": 9.0, "unet_rows_per_call": 2.0},
            {**run, "offered": 16, "throughput_images_per_s": c16_throughput, "unet_rows_per_call": 28.5},
            {**run, "offered": 16, "workload": "txt2img", "throughput_images_per_s": 99.0},
        ],
    }


def test_the_summary_is_its_definitions():
    from serving.bench.bench import family_summary, rows_per_call

    summary = family_summary(_report())
    assert summary["family"] == "sdxl" and summary["diffusers_pipeline"] == "StableDiffusionXLPipeline"
    assert [level["concurrency"] for level in summary["levels"]] == [1, 16]  # the mix rounds are not levels
    assert summary["throughput_c16_over_diffusers"] == pytest.approx(12.0 / 2.0)
    assert summary["latency_over_bare"] == pytest.approx(0.09 / 0.08)
    assert [level["unet_rows_per_call"] for level in summary["levels"]] == [2.0, 28.5]
    assert summary["cpu_over_bare"] is None  # no CPU times in this report
    assert summary["cpu_per_image_diffusers_over_c16"] is None
    with_cpu = family_summary(
        {
            **_report(),
            "a_diffusers_cpu_s": [0.6, 0.4, 0.5],
            "runs": [{**r, "server_cpu_s_per_image": 0.25} for r in _report()["runs"]],
        }
    )
    assert with_cpu["cpu_per_image_diffusers_over_c16"] == pytest.approx(0.5 / 0.25)
    assert family_summary(
        {**_report(), "single_request": {"server_cpu_s": [0.2, 0.1, 0.3], "bare_loop_cpu_s": [0.1, 0.2, 0.4]}}
    )["cpu_over_bare"] == pytest.approx(0.2 / 0.2)
    # rows per call from the server's counters (calls, rows) before and after a loop
    assert rows_per_call((10, 20), (110, 2870)) == pytest.approx(28.5)
    assert rows_per_call((10, 20), (10, 20)) is None


@pytest.mark.slow
def test_bench_on_tiny_sdxl_reports_the_family_and_consistent_ratios(sdxl_checkpoint, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "bench",
            "--checkpoint",
            str(sdxl_checkpoint),
            "--out",
            str(tmp_path),
            "--steps",
            "4",
            "--requests",
            "16",
            "--concurrency",
            "1,16",
            "--baseline-runs",
            "2",
            "--rss-requests",
            "0",
            "--mix-rounds",
            "1",
            "--load-fractions",
            "",
            "--no-sequential",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    summary = report["summary"]
    assert report["family"] == summary["family"] == "sdxl"
    assert summary["diffusers_pipeline"] == "StableDiffusionXLPipeline"
    assert all(r["completed"] == 16 and not r["errors"] for r in report["runs"]), report["runs"]
    # the ratios are throughput / baseline and latency / baseline of this JSON
    c16 = next(r for r in report["runs"] if r["mode"] == "closed" and r["offered"] == 16 and "workload" not in r)
    assert report["a_diffusers_latency_s"] == pytest.approx(float(np.median(report["a_diffusers_s"])))
    assert summary["throughput_c16_over_diffusers"] == pytest.approx(
        c16["throughput_images_per_s"] * report["a_diffusers_latency_s"]
    )
    single = report["single_request"]
    assert len(single["server_s"]) == len(single["bare_loop_s"]) == 8
    assert summary["latency_over_bare"] == pytest.approx(
        np.median(single["server_s"]) / np.median(single["bare_loop_s"])
    )
    assert len(single["server_cpu_s"]) == len(single["bare_loop_cpu_s"]) == 8
    assert summary["cpu_over_bare"] == pytest.approx(
        np.median(single["server_cpu_s"]) / np.median(single["bare_loop_cpu_s"])
    )
    assert summary["cpu_per_image_diffusers_over_c16"] == pytest.approx(
        np.median(report["a_diffusers_cpu_s"]) / c16["server_cpu_s_per_image"]
    )
    targets = {t["target"].split(" ")[0]: t for t in report["targets"]}
    assert targets["throughput"]["measured"] == round(summary["throughput_c16_over_diffusers"], 3)
    assert targets["single-request"]["measured"] == round(summary["latency_over_bare"], 3)
    # one client: each UNet call is one request's 2 rows; 16 clients: more, within the row cap
    levels = {level["concurrency"]: level for level in summary["levels"]}
    assert levels[1]["unet_rows_per_call"] == 2.0
    assert 2.0 < levels[16]["unet_rows_per_call"] <= 2 * report["max_active"]
    assert "family sdxl (diffusers StableDiffusionXLPipeline)" in done.stdout
    assert "| server, closed loop, 16 clients |" in done.stdout


def test_unet_rows_measures_the_sdxl_unet(sdxl_repo):
    """--unet-rows feeds every input the exported UNet has (SDXL: text_embeds, time_ids)."""
    from serving.bench.unet_rows import unet_row_costs

    costs = unet_row_costs(sdxl_repo, 32, rows=(2, 4), rounds=1)
    assert [c["rows"] for c in costs] == [2, 4] and costs[0]["cpu_vs_first"] == 1.0
