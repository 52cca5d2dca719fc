"""A real tritonserver whose pipeline runs every component with the torch runner (CPU here)."""

import json
import urllib.request

import numpy as np
import pytest
import torch

from serving.client.kserve import LdmClient
from serving.core.sampler import noise_generator

PROMPT = "a large red circle on the left"


@pytest.fixture(scope="module")
def torch_repo(tiny_checkpoint, tmp_path_factory):
    from export.cli import pipeline_parameters
    from export.repository import has_artifacts, write_repository

    repo = tmp_path_factory.mktemp("torch") / "repo"
    write_repository(
        tiny_checkpoint,
        repo,
        pipeline_parameters=pipeline_parameters(unet="torch", text_vae="torch"),
        log=lambda *a: None,
    )
    assert has_artifacts(repo)
    return repo


@pytest.fixture(scope="module")
def torch_server(torch_repo, triton_servers):
    with triton_servers.running(torch_repo, "tritonserver-torch") as running:
        yield running


def test_repository_carries_the_weights_and_no_component_models(torch_repo):
    assert sorted(p.name for p in torch_repo.iterdir()) == ["pipeline", "pipeline_unary"]
    copy = torch_repo / "pipeline" / "1" / "checkpoint"
    assert all((copy / folder / "config.json").is_file() for folder in ("text_encoder", "unet", "vae"))
    info = json.loads((torch_repo / "pipeline" / "1" / "pipeline.json").read_text())
    assert info["served"] == [] and info["placement"] == {"gpu": False} and info["preview"]["weights"]


def test_served_image_matches_diffusers(torch_server, tiny_checkpoint):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with LdmClient(torch_server.grpc_url) as client:
        for seed, guidance in ((31, 5.0), (32, 1.0)):
            served = client.generate(PROMPT, negative_prompt="blue", seed=seed, steps=10, guidance_scale=guidance)
            latents = noise_generator(seed).standard_normal((4, 8, 8), dtype=np.float32)[None]
            reference = pipe(
                PROMPT,
                negative_prompt="blue",
                num_inference_steps=10,
                guidance_scale=guidance,
                height=32,
                width=32,
                latents=torch.from_numpy(latents),
                output_type="np",
            ).images[0]
            reference = (reference * 255).round().astype(np.uint8)
            diff = np.abs(served.astype(int) - reference.astype(int)).mean()
            assert diff <= 1.0, f"seed {seed}: mean abs pixel difference {diff:.3f}/255"
        assert client.generate(PROMPT, seed=1, steps=3, height=48, width=64).shape == (48, 64, 3)


def test_row_cap_is_a_metric(torch_server):
    text = urllib.request.urlopen(torch_server.metrics_url, timeout=5).read().decode()
    assert 'ldm_unet_row_cap{model="pipeline"} 32' in text
