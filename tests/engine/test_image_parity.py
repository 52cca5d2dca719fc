"""Image-conditioned generation in process against diffusers' pipelines given the same noise:
img2img vs StableDiffusionImg2ImgPipeline and latent-blend inpainting vs
StableDiffusionInpaintPipeline (4-channel UNet) on the default model; 9-channel inpainting and
the x4 upscaler on tiny random checkpoints. "The same noise": diffusers' draws are replaced by
the ones the service makes from the request's seed (x_T; VAE posterior samples and the
upscaler's low-res noise from the seed's image stream), in the order each pipeline draws them."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionUpscalePipeline

from tests.support.image_inputs import generate, half_mask, one_object_scene, photo, service
from serving.core.sampler import image_noise_generator, noise_generator

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "ldm-shapes"
PROMPT = "a large blue circle on the left of a black background"
TINY_PROMPT = "a large red circle on the left"
MAX_MEAN_ABS = 1 / 255


@pytest.fixture(scope="module")
def shapes(default_repo):
    return service(default_repo)


@pytest.fixture(scope="module")
def variants(variant_repo):
    return service(variant_repo)


def load(cls, checkpoint):
    pipe = cls.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, monkeypatch, noises, posteriors, **call) -> np.ndarray:
    """uint8 image from `pipe` with its randn_tensor draws replaced by `noises` and its VAE
    posterior samples (retrieve_latents) by mean + std x `posteriors`, in call order."""
    module = sys.modules[type(pipe).__module__]
    noises, posteriors = [torch.from_numpy(n) for n in noises], [torch.from_numpy(p) for p in posteriors]
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: noises.pop(0).reshape(shape))
    if hasattr(module, "retrieve_latents"):

        def sample(output, generator=None, sample_mode="sample"):
            eps = posteriors.pop(0) if posteriors else torch.zeros_like(output.latent_dist.mean[0])
            return output.latent_dist.mean + output.latent_dist.std * eps[None]

        monkeypatch.setattr(module, "retrieve_latents", sample)
    with torch.no_grad():
        image = pipe(output_type="np", **call).images[0]
    return (image * 255).round().astype(np.uint8)


def draws(seed, latent_shape, posteriors=0, low_res_shape=None):
    """The service's draws for a request: x_T; then from the image stream, the posterior noises
    (init image, masked image) or the upscaler's low-res noise."""
    x_t = noise_generator(seed).standard_normal(latent_shape, dtype=np.float32)
    stream = image_noise_generator(seed)
    if low_res_shape is not None:
        return x_t, stream.standard_normal(low_res_shape, dtype=np.float32)
    return x_t, [stream.standard_normal(latent_shape, dtype=np.float32) for _ in range(posteriors)]


def mean_abs(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean()) / 255


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_matches_diffusers_on_the_default_model(shapes, monkeypatch, strength):
    image, _ = one_object_scene()
    seed = 5
    served = generate(shapes, PROMPT, init_image=image, strength=strength, seed=seed, steps=25, guidance_scale=5.0)
    x_t, posterior = draws(seed, (4, 16, 16), posteriors=1)
    pipe = load(StableDiffusionImg2ImgPipeline, CHECKPOINT)
    expected = reference(
        pipe,
        monkeypatch,
        [x_t],
        posterior,
        prompt=PROMPT,
        image=Image.fromarray(image),
        strength=strength,
        num_inference_steps=25,
        guidance_scale=5.0,
    )
    diff = mean_abs(served, expected)
    print(f"img2img strength {strength} vs diffusers: mean abs {diff * 255:.4f}/255")
    assert diff <= MAX_MEAN_ABS
    assert mean_abs(served, image) > 0  # it did change the image


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_latent_blend_inpainting_matches_diffusers_on_the_default_model(shapes, monkeypatch, strength):
    image, _ = one_object_scene()
    caption = "a red circle to the left of a yellow square on a black background"
    diff = inpainting_difference(
        shapes, CHECKPOINT, monkeypatch, caption, image, half_mask(64), strength, seed=8, steps=25, posteriors=1
    )
    print(f"latent-blend inpainting strength {strength} vs diffusers: mean abs {diff * 255:.4f}/255")
    assert diff <= MAX_MEAN_ABS


def inpainting_difference(
    svc, checkpoint, monkeypatch, prompt, image, mask, strength, seed, steps, posteriors
) -> float:
    """Mean abs difference of the served inpainting (no paste-back) from diffusers' given the same noise."""
    served = generate(
        svc,
        prompt,
        init_image=image,
        mask=mask,
        strength=strength,
        keep_unmasked=False,
        seed=seed,
        steps=steps,
        guidance_scale=5.0,
    )
    size = image.shape[0]
    x_t, posterior = draws(seed, (4, size // 4, size // 4), posteriors=posteriors)
    pipe = load(StableDiffusionInpaintPipeline, checkpoint)
    expected = reference(
        pipe,
        monkeypatch,
        [x_t],
        posterior,
        prompt=prompt,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=5.0,
        height=size,
        width=size,
    )
    return mean_abs(served, expected)


@pytest.mark.parametrize("mask_blur", [0, 3])
def test_pixels_outside_the_mask_are_the_input_when_keep_unmasked(shapes, mask_blur):
    image, _ = one_object_scene()
    mask = half_mask(64)
    mask[10:20, 40:50] = 100  # below the threshold (128): kept
    caption = "a red circle to the left of a yellow square on a black background"
    fields = dict(init_image=image, mask=mask, seed=3, steps=10, mask_blur=mask_blur)
    kept = generate(shapes, caption, **fields)
    blended = generate(shapes, caption, keep_unmasked=False, **fields)
    repaint = mask >= 128
    reach = int(3 * mask_blur + 0.5)  # the blur kernel's radius
    outside, inside = ~dilate(repaint, reach), ~dilate(~repaint, reach)
    assert np.array_equal(kept[outside], image[outside])
    assert not np.array_equal(blended[outside], image[outside])  # without the paste-back the VAE changes them
    assert np.abs(kept[inside].astype(int) - blended[inside]).max() <= 1  # the generated pixels, where the blur is 1


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` (on both axes) of a True pixel."""
    if radius == 0:
        return mask
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, radius), (2 * radius + 1,) * 2)
    return windows.any(axis=(2, 3))


def test_img2img_at_full_strength_is_txt2img_bit_for_bit(shapes):
    """Zero terminal SNR: alpha_bar(999) is exactly 0, so the image noised to the first timestep
    is the seed's x_T itself, and strength 1 runs every timestep."""
    image, _ = one_object_scene()
    fields = dict(seed=21, steps=25, guidance_scale=5.0)
    txt2img = generate(shapes, PROMPT, **fields)
    img2img = generate(shapes, PROMPT, init_image=image, strength=1.0, **fields)
    assert img2img.tobytes() == txt2img.tobytes()


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_unet_matches_diffusers(variants, tiny_inpaint_checkpoint, monkeypatch, strength):
    # the 9-channel UNet sees the masked image; the init image is encoded only to start a partial schedule
    diff = inpainting_difference(
        variants,
        tiny_inpaint_checkpoint,
        monkeypatch,
        TINY_PROMPT,
        photo(32, 1),
        half_mask(32, "left"),
        strength,
        seed=13,
        steps=12,
        posteriors=1 if strength == 1.0 else 2,
    )
    print(f"9-channel inpainting strength {strength} vs diffusers: mean abs {diff * 255:.4f}/255")
    assert diff <= MAX_MEAN_ABS


@pytest.mark.parametrize("noise_level", [20, 150])
def test_upscale_matches_diffusers(variants, tiny_upscale_checkpoint, monkeypatch, noise_level):
    low_res, seed = photo(8, 2), 17
    served = generate(
        variants,
        TINY_PROMPT,
        task="upscale",
        init_image=low_res,
        noise_level=noise_level,
        seed=seed,
        steps=12,
        guidance_scale=5.0,
    )
    assert served.shape == (32, 32, 3)
    x_t, low_res_noise = draws(seed, (4, 8, 8), low_res_shape=(3, 8, 8))
    pipe = load(StableDiffusionUpscalePipeline, tiny_upscale_checkpoint)
    expected = reference(
        pipe,
        monkeypatch,
        [low_res_noise],
        [],
        prompt=TINY_PROMPT,
        image=Image.fromarray(low_res),
        noise_level=noise_level,
        num_inference_steps=12,
        guidance_scale=5.0,
        latents=torch.from_numpy(x_t)[None],
    )
    diff = mean_abs(served, expected)
    print(f"upscale noise_level {noise_level} vs diffusers: mean abs {diff * 255:.4f}/255")
    assert diff <= MAX_MEAN_ABS
