"""SDXL served exactly: the tiny random SDXL checkpoints (training/tiny_checkpoint.py kinds "sdxl"
and "sdxl-inpaint") exported beside the tiny SD one in one repository and served in this process
(ONNX Runtime), against diffusers 0.42.1 given the same noise, and against themselves in crowds.

- exactness: StableDiffusionXLPipeline (samplers, with and without guidance, an empty negative
  prompt = diffusers' negative_prompt=None under force_zeros_for_empty_prompt, a negative prompt,
  the size-conditioning fields), StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
  on the 9-channel UNet and on the base UNet (latent blend). "The same noise": x_T is the seed's
  noise_generator draw (passed as `latents=`, or as the pipeline's randn_tensor draw where it
  noises an image), the per-step draws of ancestral samplers follow it from the same stream, and
  the VAE posterior samples come from the seed's image stream, in the order the pipelines draw
  them (as tests/test_sampler_parity.py and tests/test_image_parity.py do for SD). Target: mean
  abs difference <= 1/255 on the uint8 images; each case prints its number;
- batch invariance: a crowd of SDXL requests of every kind, and SD requests of the other model of
  the same server, each gives the bytes it gives alone; the two models never share a UNet call;
- regions (latent mode) against a written-out latent-couple loop over diffusers' modules, and
  attention mode refused (INVALID_ARG region_mode); a steer at step k against diffusers' pipeline
  whose embeddings are swapped after step k (callback_on_step_end);
- the torch runner (CPU) serving the tiny SDXL: components equal ONNX at two batch sizes, images
  equal the ONNX runner's.
"""
import sys

import numpy as np
from PIL import Image
import pytest
import torch
from diffusers import (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)

from export.cli import pipeline_parameters
from image_inputs import Sink, drain, generate, half_mask, photo, service, submit
from serving.client.kserve import request_arrays
from serving.core.errors import INVALID_ARG
from serving.core.sampler import image_noise_generator, noise_generator
from test_samplers import REFERENCES

PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
B = "a yellow star on the left"
SD_PROMPT = "a large red circle on the left"
MAX_MEAN_ABS = 1 / 255
STEPS = 6
MODEL, BLEND_MODEL, SD_MODEL = "sdxl", "sdxl-blend", "sd"  # the repository's models (fixture `repo`)


def int2(a, b):
    return np.array([a, b], np.int32)


SIZES = dict(original_size=int2(64, 48), crop_top_left=int2(4, 2), target_size=int2(32, 24))  # request fields
DIFFUSERS_SIZES = dict(original_size=(64, 48), crops_coords_top_left=(4, 2), target_size=(32, 24))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from training.tiny_checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("sdxl")
    return write_tiny_checkpoint(root / "tiny-sdxl", kind="sdxl"), write_tiny_checkpoint(root / "tiny-sdxl-inpaint",
                                                                                        kind="sdxl-inpaint")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, checkpoints, tiny_checkpoint):
    """One repository: the SDXL model with its 9-channel inpainting variant (default), the tiny SD
    model beside it, and the SDXL base checkpoint again as a model without an inpainting UNet
    (inpainting by latent blend; its components are shared with the first, not exported twice)."""
    from export.repository import write_repository

    sdxl, sdxl_inpaint = checkpoints
    path = tmp_path_factory.mktemp("sdxl-repo") / "model_repository"
    write_repository(sdxl, path, pipeline_parameters=pipeline_parameters(), log=lambda *a: None, name=MODEL,
                     variants={"inpaint": sdxl_inpaint}, models={SD_MODEL: tiny_checkpoint, BLEND_MODEL: sdxl})
    return path


@pytest.fixture(scope="module")
def svc(repo):
    return service(repo)


# --- diffusers given the same noise ---------------------------------------------------------------

_PIPES = {}


def pipeline(cls, path):
    key = (cls, str(path))
    if key not in _PIPES:
        pipe = cls.from_pretrained(path, local_files_only=True, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = pipe, dict(pipe.scheduler.config)
    return _PIPES[key]


def reference(cls, path, monkeypatch, sampler, schedule, seed, height, width, posteriors=0, **call) -> np.ndarray:
    """uint8 image of diffusers' `cls` from `path` with the sampler's scheduler, its noise replaced
    by the service's draws for `seed` (x_T, then per-step draws; `posteriors` VAE posterior
    samples from the image stream)."""
    pipe, config = pipeline(cls, path)
    scheduler_cls, extra = REFERENCES[sampler]
    scheduler = scheduler_cls.from_config({**config, **extra, **({"use_karras_sigmas": True} if schedule == "karras" else {})})
    if cls is StableDiffusionXLPipeline:  # as tests/test_sampler_parity.py: no timestep lookup (img2img pins it itself)
        set_timesteps = scheduler.set_timesteps

        def pinned(*args, **kwargs):
            set_timesteps(*args, **kwargs)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)

        scheduler.set_timesteps = pinned
    pipe.scheduler = scheduler
    rng = noise_generator(seed)
    shape = (4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    x_t = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))[None]
    monkeypatch.setattr(sys.modules[scheduler_cls.__module__], "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(rng.standard_normal(shape[1:], dtype=np.float32))[None],
                        raising=False)
    module = sys.modules[cls.__module__]
    if cls is StableDiffusionXLPipeline:
        call["latents"] = x_t
    else:
        stream = image_noise_generator(seed)
        samples = [torch.from_numpy(stream.standard_normal(shape, dtype=np.float32)) for _ in range(posteriors)]
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: x_t.reshape(shape))

        def sample(output, generator=None, sample_mode="sample"):
            eps = samples.pop(0) if samples else torch.zeros_like(output.latent_dist.mean[0])
            return output.latent_dist.mean + output.latent_dist.std * eps[None]

        monkeypatch.setattr(module, "retrieve_latents", sample)
    with torch.no_grad():
        image = pipe(output_type="np", height=height, width=width, **call).images[0]
    monkeypatch.undo()
    return (image * 255).round().astype(np.uint8)


def mean_abs(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(int) - b.astype(int)).mean()) / 255


def check(name, served, expected, limit=MAX_MEAN_ABS) -> float:
    diff = mean_abs(served, expected)
    print(f"\n{name}: mean abs {diff * 255:.4f}/255")
    assert served.std() > 1.0  # a picture, not a blank that would match any blank
    assert diff <= limit, f"{name}: {diff * 255:.4f}/255"
    return diff


SAMPLERS = [("ddim", "default"), ("euler", "default"), ("euler_ancestral", "default"), ("dpmpp_2m", "karras"),
            ("unipc", "default")]
TEXT_CASES = {  # (guidance, negative prompt)
    "no-guidance": (1.0, ""),
    "empty-negative": (5.0, ""),  # force_zeros_for_empty_prompt: diffusers' negative_prompt=None
    "negative": (5.0, NEGATIVE),
}


@pytest.mark.parametrize("text", list(TEXT_CASES))
@pytest.mark.parametrize("sampler,schedule", SAMPLERS)
def test_txt2img_matches_diffusers(svc, checkpoints, monkeypatch, sampler, schedule, text):
    guidance, negative = TEXT_CASES[text]
    served = generate(svc, PROMPT, negative_prompt=negative, sampler=sampler, sigma_schedule=schedule, seed=3,
                      steps=STEPS, guidance_scale=guidance)
    expected = reference(StableDiffusionXLPipeline, checkpoints[0], monkeypatch, sampler, schedule, 3, 32, 32,
                         prompt=PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS,
                         guidance_scale=guidance)
    check(f"txt2img {sampler} {schedule} {text}", served, expected)


def test_an_empty_negative_prompt_is_zeros_not_the_encoding_of_empty_text(svc, checkpoints, monkeypatch):
    """The test above can tell the two apart: diffusers' negative_prompt="" (encoded) is another image."""
    served = generate(svc, PROMPT, seed=3, steps=STEPS, guidance_scale=5.0)
    encoded = reference(StableDiffusionXLPipeline, checkpoints[0], monkeypatch, "ddim", "default", 3, 32, 32,
                        prompt=PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=5.0)
    diff = mean_abs(served, encoded)
    print(f"\nempty negative served vs diffusers negative_prompt='': {diff * 255:.4f}/255")
    assert diff > 2 * MAX_MEAN_ABS


@pytest.mark.parametrize("sampler,schedule", [("ddim", "default"), ("euler_ancestral", "default")])
def test_size_conditioning_matches_diffusers(svc, checkpoints, monkeypatch, sampler, schedule):
    fields = dict(negative_prompt=NEGATIVE, sampler=sampler, sigma_schedule=schedule, seed=4, steps=STEPS,
                  guidance_scale=5.0, height=40, width=32)
    served = generate(svc, PROMPT, **SIZES, **fields)
    expected = reference(StableDiffusionXLPipeline, checkpoints[0], monkeypatch, sampler, schedule, 4, 40, 32,
                         prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0,
                         **DIFFUSERS_SIZES)
    check(f"txt2img 40x32 {sampler} with original_size/crop_top_left/target_size", served, expected)
    # the fields do reach the UNet: without them (defaults: the output size, (0, 0)) the image differs
    assert mean_abs(served, generate(svc, PROMPT, **fields)) > 0
    # and the defaults are diffusers' defaults
    explicit = dict(original_size=int2(40, 32), crop_top_left=int2(0, 0), target_size=int2(40, 32))
    assert generate(svc, PROMPT, **explicit, **fields).tobytes() == generate(svc, PROMPT, **fields).tobytes()


@pytest.mark.parametrize("sampler,schedule,sizes", [("ddim", "default", False), ("euler_ancestral", "default", False),
                                                    ("dpmpp_2m", "karras", False), ("unipc", "default", True)])
def test_img2img_matches_diffusers(svc, checkpoints, monkeypatch, sampler, schedule, sizes):
    image, seed = photo(32, 1), 5
    served = generate(svc, PROMPT, init_image=image, strength=0.7, negative_prompt=NEGATIVE, sampler=sampler,
                      sigma_schedule=schedule, seed=seed, steps=STEPS, guidance_scale=5.0, **(SIZES if sizes else {}))
    expected = reference(StableDiffusionXLImg2ImgPipeline, checkpoints[0], monkeypatch, sampler, schedule, seed, 32, 32,
                         posteriors=1, prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(image),
                         strength=0.7, num_inference_steps=STEPS, guidance_scale=5.0,
                         **(DIFFUSERS_SIZES if sizes else {}))
    check(f"img2img strength 0.7 {sampler} {schedule}{' with sizes' if sizes else ''}", served, expected)
    assert mean_abs(served, image) > 0


@pytest.mark.parametrize("unet", ["9-channel", "latent-blend"])
@pytest.mark.parametrize("strength,sampler", [(1.0, "ddim"), (0.6, "ddim"), (1.0, "euler")])
def test_inpainting_matches_diffusers(svc, checkpoints, monkeypatch, unet, strength, sampler):
    """The 9-channel UNet (model sdxl's inpaint variant) against StableDiffusionXLInpaintPipeline on
    the sdxl-inpaint folder; latent blending (model sdxl-blend: no inpainting UNet) against the same
    pipeline on the base folder. Posterior samples: the init image's (latent blend always; the
    9-channel UNet only below strength 1), then the masked image's (9-channel UNet)."""
    image, mask, seed = photo(32, 1), half_mask(32, "left"), 6
    path = checkpoints[1] if unet == "9-channel" else checkpoints[0]
    posteriors = 1 if unet == "latent-blend" or strength == 1.0 else 2
    served = generate(svc, PROMPT, model=MODEL if unet == "9-channel" else BLEND_MODEL, init_image=image, mask=mask,
                      strength=strength, keep_unmasked=False, sampler=sampler, seed=seed, steps=STEPS, guidance_scale=5.0)
    expected = reference(StableDiffusionXLInpaintPipeline, path, monkeypatch, sampler, "default", seed, 32, 32,
                         posteriors=posteriors, prompt=PROMPT, image=Image.fromarray(image),
                         mask_image=Image.fromarray(mask), strength=strength, num_inference_steps=STEPS,
                         guidance_scale=5.0)
    check(f"inpaint {unet} strength {strength} {sampler}", served, expected)
