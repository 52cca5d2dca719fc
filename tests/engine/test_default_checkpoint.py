"""The shipped default model: loads offline with plain diffusers and generates the right size."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from training.package import MAX_BYTES, folder_bytes

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "ldm-shapes"


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionPipeline.from_pretrained(CHECKPOINT, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_checkpoint_is_small_safetensors_with_ddim():
    assert folder_bytes(CHECKPOINT) <= MAX_BYTES
    assert not list(CHECKPOINT.rglob("*.bin"))
    assert len(list(CHECKPOINT.rglob("*.safetensors"))) == 3
    config = DDIMScheduler.load_config(CHECKPOINT / "scheduler")
    assert config["_class_name"] == "DDIMScheduler" and config["clip_sample"] is False


def test_loads_as_fp32_standard_components(pipe):
    assert isinstance(pipe.scheduler, DDIMScheduler)
    # the classes the exporter reads; fp32 although the UNet ships fp16 weights
    for module, name in (
        (pipe.text_encoder, "CLIPTextModel"),
        (pipe.unet, "UNet2DConditionModel"),
        (pipe.vae, "AutoencoderKL"),
    ):
        assert type(module).__name__ == name and module.dtype == torch.float32


def test_generates_a_64x64_image_in_a_few_steps(pipe):
    image = pipe(
        "a large red circle on the left of a black background",
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.01


def test_schedule_starts_from_pure_noise_and_the_server_reads_it():
    """Zero terminal SNR: the first inference step (t=999) sees no signal, so the layout has to
    come from the prompt (see training/train.py build_scheduler)."""
    from serving.core.sampler import DDIMSchedule

    config = DDIMScheduler.load_config(CHECKPOINT / "scheduler")
    assert config["rescale_betas_zero_snr"] and config["prediction_type"] == "v_prediction"
    schedule = DDIMSchedule.from_config(config)
    assert schedule.timesteps(25)[0] == 999 and schedule.alphas_cumprod[999] < 1e-12
    reference = DDIMScheduler.from_config(config).alphas_cumprod.numpy()
    np.testing.assert_allclose(schedule.alphas_cumprod, reference, rtol=1e-5, atol=1e-9)
