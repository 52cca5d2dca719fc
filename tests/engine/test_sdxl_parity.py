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
  them (as tests/engine/test_sampler_parity.py and tests/engine/test_image_parity.py do for SD). Target: mean
  abs difference <= 1/255 on the uint8 images; each case prints its number;
- batch invariance: a crowd of SDXL requests of every kind, and SD requests of the other model of
  the same server, each gives the bytes it gives alone; the two models never share a UNet call;
- regions (latent mode) against a written-out latent-couple loop over diffusers' modules, and
  attention mode refused (INVALID_ARG region_mode); a steer at step k against diffusers' pipeline
  whose embeddings are swapped after step k (callback_on_step_end);
- the torch runner (CPU) serving the tiny SDXL: components equal ONNX at two batch sizes, images
  equal the ONNX runner's;
- and what the fixes made with these tests pin: a VAE with latents_mean/latents_std (SDXL
  derivatives) against diffusers, the VAE kept FP32 in FP16 builds (force_upcast), refiner-style
  folders refused, previews and steers by the job's own model, refusals naming the field.

Run with -s to see the measured differences.
"""

import json
import shutil
import sys

import numpy as np
from PIL import Image
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

from export.cli import pipeline_parameters
from tests.support.image_inputs import Sink, drain, generate, half_mask, photo, service, submit
from serving.core.config import PipelineConfig
from serving.client.kserve import request_arrays
from serving.core.errors import INVALID_ARG
from serving.core.request import InvalidInput
from serving.core.sampler import image_noise_generator, noise_generator
from tests.support.samplers import REFERENCES

PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
B = "a yellow star on the left"
SD_PROMPT = "a large red circle on the left"
MAX_MEAN_ABS = 1 / 255
STEPS = 6
MODEL, BLEND_MODEL, SD_MODEL, STATS_MODEL = "sdxl", "sdxl-blend", "sd", "sdxl-stats"  # the repository's models (`repo`)
# a VAE with per-channel latent statistics (SDXL derivatives such as Playground v2.5 have them):
# diffusers decodes latents * std / scaling_factor + mean and encodes (z - mean) * scaling_factor / std
LATENTS_MEAN, LATENTS_STD = [0.4, -0.3, 0.2, -0.1], [1.5, 0.7, 1.2, 0.9]


def int2(a, b):
    return np.array([a, b], np.int32)


SIZES = dict(original_size=int2(64, 48), crop_top_left=int2(4, 2), target_size=int2(32, 24))  # request fields
DIFFUSERS_SIZES = dict(original_size=(64, 48), crops_coords_top_left=(4, 2), target_size=(32, 24))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from training.tiny_checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("sdxl")
    base = write_tiny_checkpoint(root / "tiny-sdxl", kind="sdxl")
    stats = root / "tiny-sdxl-stats"  # the same checkpoint, its VAE config with latent statistics
    shutil.copytree(base, stats)
    config = json.loads((stats / "vae" / "config.json").read_text())
    (stats / "vae" / "config.json").write_text(
        json.dumps({**config, "latents_mean": LATENTS_MEAN, "latents_std": LATENTS_STD})
    )
    return base, write_tiny_checkpoint(root / "tiny-sdxl-inpaint", kind="sdxl-inpaint"), stats


@pytest.fixture(scope="module")
def repo(tmp_path_factory, checkpoints, tiny_checkpoint):
    """One repository: the SDXL model with its 9-channel inpainting variant (default), the tiny SD
    model beside it, the SDXL base checkpoint again as a model without an inpainting UNet
    (inpainting by latent blend; its components are shared with the first, not exported twice),
    and the checkpoint whose VAE has latent statistics (only its VAE is exported again)."""
    from export.repository import write_repository

    sdxl, sdxl_inpaint, stats = checkpoints
    path = tmp_path_factory.mktemp("sdxl-repo") / "model_repository"
    write_repository(
        sdxl,
        path,
        pipeline_parameters=pipeline_parameters(),
        log=lambda *a: None,
        name=MODEL,
        variants={"inpaint": sdxl_inpaint},
        models={SD_MODEL: tiny_checkpoint, BLEND_MODEL: sdxl, STATS_MODEL: stats},
    )
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
    scheduler = scheduler_cls.from_config(
        {**config, **extra, **({"use_karras_sigmas": True} if schedule == "karras" else {})}
    )
    if (
        cls is StableDiffusionXLPipeline
    ):  # as tests/engine/test_sampler_parity.py: no timestep lookup (img2img pins it itself)
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
    monkeypatch.setattr(
        sys.modules[scheduler_cls.__module__],
        "randn_tensor",
        lambda shape, **kw: torch.from_numpy(rng.standard_normal(shape[1:], dtype=np.float32))[None],
        raising=False,
    )
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


SAMPLERS = [
    ("ddim", "default"),
    ("euler", "default"),
    ("euler_ancestral", "default"),
    ("dpmpp_2m", "karras"),
    ("unipc", "default"),
]
TEXT_CASES = {  # (guidance, negative prompt)
    "no-guidance": (1.0, ""),
    "empty-negative": (5.0, ""),  # force_zeros_for_empty_prompt: diffusers' negative_prompt=None
    "negative": (5.0, NEGATIVE),
}


@pytest.mark.parametrize("text", list(TEXT_CASES))
@pytest.mark.parametrize("sampler,schedule", SAMPLERS)
def test_txt2img_matches_diffusers(svc, checkpoints, monkeypatch, sampler, schedule, text):
    guidance, negative = TEXT_CASES[text]
    served = generate(
        svc,
        PROMPT,
        negative_prompt=negative,
        sampler=sampler,
        sigma_schedule=schedule,
        seed=3,
        steps=STEPS,
        guidance_scale=guidance,
    )
    expected = reference(
        StableDiffusionXLPipeline,
        checkpoints[0],
        monkeypatch,
        sampler,
        schedule,
        3,
        32,
        32,
        prompt=PROMPT,
        negative_prompt=negative or None,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
    )
    check(f"txt2img {sampler} {schedule} {text}", served, expected)


def test_an_empty_negative_prompt_is_zeros_not_the_encoding_of_empty_text(svc, checkpoints, monkeypatch):
    """The test above can tell the two apart: diffusers' negative_prompt="" (encoded) is another image."""
    served = generate(svc, PROMPT, seed=3, steps=STEPS, guidance_scale=5.0)
    encoded = reference(
        StableDiffusionXLPipeline,
        checkpoints[0],
        monkeypatch,
        "ddim",
        "default",
        3,
        32,
        32,
        prompt=PROMPT,
        negative_prompt="",
        num_inference_steps=STEPS,
        guidance_scale=5.0,
    )
    diff = mean_abs(served, encoded)
    print(f"\nempty negative served vs diffusers negative_prompt='': {diff * 255:.4f}/255")
    assert diff > 2 * MAX_MEAN_ABS


@pytest.mark.parametrize("sampler,schedule", [("ddim", "default"), ("euler_ancestral", "default")])
def test_size_conditioning_matches_diffusers(svc, checkpoints, monkeypatch, sampler, schedule):
    fields = dict(
        negative_prompt=NEGATIVE,
        sampler=sampler,
        sigma_schedule=schedule,
        seed=4,
        steps=STEPS,
        guidance_scale=5.0,
        height=40,
        width=32,
    )
    served = generate(svc, PROMPT, **SIZES, **fields)
    expected = reference(
        StableDiffusionXLPipeline,
        checkpoints[0],
        monkeypatch,
        sampler,
        schedule,
        4,
        40,
        32,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        **DIFFUSERS_SIZES,
    )
    check(f"txt2img 40x32 {sampler} with original_size/crop_top_left/target_size", served, expected)
    # the fields do reach the UNet: without them (defaults: the output size, (0, 0)) the image differs
    assert mean_abs(served, generate(svc, PROMPT, **fields)) > 0
    # and the defaults are diffusers' defaults
    explicit = dict(original_size=int2(40, 32), crop_top_left=int2(0, 0), target_size=int2(40, 32))
    assert generate(svc, PROMPT, **explicit, **fields).tobytes() == generate(svc, PROMPT, **fields).tobytes()


@pytest.mark.parametrize(
    "sampler,schedule,sizes",
    [
        ("ddim", "default", False),
        ("euler_ancestral", "default", False),
        ("dpmpp_2m", "karras", False),
        ("unipc", "default", True),
    ],
)
def test_img2img_matches_diffusers(svc, checkpoints, monkeypatch, sampler, schedule, sizes):
    image, seed = photo(32, 1), 5
    served = generate(
        svc,
        PROMPT,
        init_image=image,
        strength=0.7,
        negative_prompt=NEGATIVE,
        sampler=sampler,
        sigma_schedule=schedule,
        seed=seed,
        steps=STEPS,
        guidance_scale=5.0,
        **(SIZES if sizes else {}),
    )
    expected = reference(
        StableDiffusionXLImg2ImgPipeline,
        checkpoints[0],
        monkeypatch,
        sampler,
        schedule,
        seed,
        32,
        32,
        posteriors=1,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=Image.fromarray(image),
        strength=0.7,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        **(DIFFUSERS_SIZES if sizes else {}),
    )
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
    served = generate(
        svc,
        PROMPT,
        model=MODEL if unet == "9-channel" else BLEND_MODEL,
        init_image=image,
        mask=mask,
        strength=strength,
        keep_unmasked=False,
        sampler=sampler,
        seed=seed,
        steps=STEPS,
        guidance_scale=5.0,
    )
    expected = reference(
        StableDiffusionXLInpaintPipeline,
        path,
        monkeypatch,
        sampler,
        "default",
        seed,
        32,
        32,
        posteriors=posteriors,
        prompt=PROMPT,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask),
        strength=strength,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
    )
    check(f"inpaint {unet} strength {strength} {sampler}", served, expected)


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_a_vae_with_latent_statistics_matches_diffusers(svc, checkpoints, monkeypatch, task):
    """StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on a folder whose VAE config has
    latents_mean and latents_std (the decoder and encoder exports apply them as diffusers does)."""
    image, seed = photo(32, 2), 7
    fields = dict(negative_prompt=NEGATIVE, seed=seed, steps=STEPS, guidance_scale=5.0)
    call = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=5.0)
    if task == "img2img":
        fields.update(init_image=image, strength=0.7)
        served = generate(svc, PROMPT, model=STATS_MODEL, **fields)
        expected = reference(
            StableDiffusionXLImg2ImgPipeline,
            checkpoints[2],
            monkeypatch,
            "ddim",
            "default",
            seed,
            32,
            32,
            posteriors=1,
            image=Image.fromarray(image),
            strength=0.7,
            **call,
        )
    else:
        served = generate(svc, PROMPT, model=STATS_MODEL, **fields)
        expected = reference(
            StableDiffusionXLPipeline, checkpoints[2], monkeypatch, "ddim", "default", seed, 32, 32, **call
        )
    check(f"{task} with a VAE with latents_mean/latents_std", served, expected)
    assert mean_abs(served, generate(svc, PROMPT, **fields)) > 2 * MAX_MEAN_ABS  # the statistics matter


# --- batch invariance ------------------------------------------------------------------------------

REGIONS = dict(region_prompts=["a red circle", "a blue square"], region_divisions="1,1", base_prompt_weight=0.3)
CROWD = [  # (prompt, fields): SDXL requests of every kind, size and sampler; SD requests of the other model
    (PROMPT, dict(seed=11, steps=7, guidance_scale=5.0)),
    (PROMPT, dict(seed=12, steps=5, guidance_scale=1.0, height=40, width=32, sampler="euler_ancestral")),
    (
        B,
        dict(
            seed=13,
            steps=6,
            negative_prompt=NEGATIVE,
            sampler="dpmpp_2m",
            sigma_schedule="karras",
            height=48,
            width=48,
            **SIZES,
        ),
    ),
    (PROMPT, dict(seed=14, steps=8, init_image=photo(32, 3), strength=0.6, sampler="unipc", guidance_scale=5.0)),
    (PROMPT, dict(seed=15, steps=6, init_image=photo(32, 4), mask=half_mask(32), mask_blur=2, guidance_scale=7.5)),
    (
        PROMPT,
        dict(
            model=BLEND_MODEL,
            seed=16,
            steps=7,
            init_image=photo(48, 5),
            mask=half_mask(48, "left"),
            strength=0.8,
            sampler="euler",
            guidance_scale=5.0,
        ),
    ),
    (PROMPT, dict(model=BLEND_MODEL, seed=17, steps=4, guidance_scale=3.0)),
    (PROMPT, dict(seed=18, steps=6, guidance_scale=5.0, negative_prompt=NEGATIVE, **REGIONS)),
    (B, dict(seed=19, steps=5, eta=0.5, guidance_scale=5.0)),
    (SD_PROMPT, dict(model=SD_MODEL, seed=20, steps=6, guidance_scale=5.0)),
    (
        SD_PROMPT,
        dict(
            model=SD_MODEL, seed=21, steps=8, init_image=photo(32, 6), strength=0.7, sampler="euler", guidance_scale=5.0
        ),
    ),
    (SD_PROMPT, dict(model=SD_MODEL, seed=22, steps=5, height=48, width=32, guidance_scale=1.0)),
]


class Recording:
    """Wraps one runner's models (runner keys are (model, variant)): records each UNet call's
    runner, rows, text-context width and further input names."""

    def __init__(self, models, key, log):
        self.models, self.key, self.log = models, key, log

    def __getattr__(self, name):
        return getattr(self.models, name)

    def unet(self, sample, timestep, encoder_hidden_states, **extra):
        self.log.append((self.key, len(sample), encoder_hidden_states.shape[-1], tuple(sorted(extra))))
        return self.models.unet(sample, timestep, encoder_hidden_states, **extra)


def test_every_request_is_bit_identical_alone_and_in_a_mixed_crowd_and_models_never_share_a_call(repo, svc):
    alone = [generate(svc, prompt, **fields) for prompt, fields in CROWD]
    log = []
    crowd = service(repo)
    for key, runner in crowd.engine.runner.runners.items():
        runner.models = Recording(runner.models, key, log)
    half = len(CROWD) // 2
    sinks = [submit(crowd, prompt, **fields) for prompt, fields in CROWD[:half]]
    for _ in range(2):  # the first half is mid-flight when the rest joins
        crowd.engine.run_iteration()
    sinks += [submit(crowd, prompt, **fields) for prompt, fields in CROWD[half:]]
    drain(crowd)
    assert all(s.error is None and s.ends == 1 for s in sinks), [s.error for s in sinks]
    for i, (sink, image) in enumerate(zip(sinks, alone)):
        assert sink.image.tobytes() == image.tobytes(), (i, CROWD[i][1], mean_abs(sink.image, image) * 255)
    # one runner per call (the Recording of one (model, variant)), and that runner's inputs only
    widths = {(key[0], width, extra) for key, _, width, extra in log}
    assert widths == {
        (MODEL, 64, ("text_embeds", "time_ids")),
        (BLEND_MODEL, 64, ("text_embeds", "time_ids")),
        (SD_MODEL, 32, ()),
    }, widths
    assert {key for key, *_ in log} == {(MODEL, "base"), (MODEL, "inpaint"), (BLEND_MODEL, "base"), (SD_MODEL, "base")}
    rows, calls = sum(r for _, r, *_ in log), len(log)
    print(f"\nmixed crowd: {calls} UNet calls, {rows / calls:.1f} rows per call")
    assert max(r for key, r, *_ in log if key == (MODEL, "base")) > 4  # requests of one model did share calls


# --- regions and steering --------------------------------------------------------------------------


class Loop:
    """A written-out SDXL denoising loop over diffusers' modules (the tiny SDXL pipeline's text
    encoders, UNet, VAE and its DDIM scheduler): `plan(i)` gives step i's conditional texts, their
    latent-cell weights, the negative text each is guided against (None: zeros,
    force_zeros_for_empty_prompt) and the guidance scale; eps = sum_k W_k (u_k + g (c_k - u_k))."""

    def __init__(self, path):
        self.pipe, config = pipeline(StableDiffusionXLPipeline, path)
        self.config = config

    @torch.no_grad()
    def embed(self, text):
        if text is None:
            embeds, pooled = self.embed("x")
            return torch.zeros_like(embeds), torch.zeros_like(pooled)
        embeds, _, pooled, _ = self.pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
        return embeds, pooled

    @torch.no_grad()
    def image(self, plan, seed, steps=STEPS, size=32) -> np.ndarray:
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.config)
        scheduler.set_timesteps(steps)
        x = torch.from_numpy(noise_generator(seed).standard_normal((4, size // 4, size // 4), dtype=np.float32))[None]
        x = x * scheduler.init_noise_sigma
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        for i, t in enumerate(scheduler.timesteps):
            texts, weights, negatives, guidance = plan(i)
            rows = (
                [self.embed(text) for text in texts] + [self.embed(n) for n in negatives]
                if guidance > 1
                else [self.embed(text) for text in texts]
            )
            embeds, pooled = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            model_in = scheduler.scale_model_input(x, t).expand(len(rows), -1, -1, -1)
            out = self.pipe.unet(
                model_in,
                t,
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(len(rows), -1)},
                return_dict=False,
            )[0]
            cond = out[: len(texts)]
            if guidance > 1:
                uncond = out[len(texts) :]
                cond = uncond + guidance * (cond - uncond)
            eps = (torch.from_numpy(weights)[:, None] * cond).sum(0, keepdim=True)
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        image = self.pipe.vae.decode(x / self.pipe.vae.config.scaling_factor, return_dict=False)[0]
        return ((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def halves_weights(base_weight, size=32) -> np.ndarray:
    """[3, h, w] latent-cell weights of region_divisions "1,1": the base prompt everywhere at
    `base_weight`, the left and right halves' prompts at 1 - base_weight in their half."""
    side = size // 4
    weights = np.zeros((3, side, side), np.float32)
    weights[0] = base_weight
    weights[1, :, : side // 2] = weights[2, :, side // 2 :] = 1 - base_weight
    return weights


@pytest.fixture(scope="module")
def loop(checkpoints):
    return Loop(checkpoints[0])


@pytest.mark.parametrize("negatives", [None, [NEGATIVE, ""]], ids=["request-negative", "region-negatives"])
def test_latent_regions_match_the_written_out_loop(svc, loop, negatives):
    """Latent mode's rows: the base prompt and each region's (each with its own pooled text_embeds),
    guided against their negative prompts; an empty region negative prompt is zeros (no encoding)."""
    fields = dict(REGIONS, negative_prompt=NEGATIVE, seed=9, steps=STEPS, guidance_scale=5.0, region_mode="latent")
    if negatives is not None:
        fields["region_negative_prompts"] = negatives
    served = generate(svc, PROMPT, **fields)
    texts = [PROMPT, *REGIONS["region_prompts"]]
    guided_against = [NEGATIVE, *(None if n == "" else n for n in negatives or [NEGATIVE, NEGATIVE])]
    expected = loop.image(lambda i: (texts, halves_weights(0.3), guided_against, 5.0), seed=9)
    check(
        f"regions latent {'with region negatives' if negatives else 'request negative'} vs the loop", served, expected
    )
    assert mean_abs(served, generate(svc, PROMPT, negative_prompt=NEGATIVE, seed=9, steps=STEPS)) > 0


def test_attention_regions_are_refused_naming_region_mode(svc):
    sink = submit(svc, PROMPT, seed=1, steps=STEPS, region_mode="attention", **REGIONS)
    drain(svc)
    assert sink.error is not None and sink.error[0] == INVALID_ARG and "region_mode" in sink.error[1], sink.error
    assert generate(svc, SD_PROMPT, model=SD_MODEL, seed=1, steps=STEPS, region_mode="attention", **REGIONS).std() > 1


def steered(svc, k, steer, **fields) -> np.ndarray:
    """The image of a request steered with `steer` (request fields, a prompt among them) after k steps."""
    sink = Sink()
    svc.submit(request_arrays(PROMPT, **fields), sink, request_id="steered")
    while svc.engine.registry.running["steered"].index < k:
        assert svc.engine.run_iteration()
    svc.steer("steered", request_arrays(steer["prompt"], **{n: v for n, v in steer.items() if n != "prompt"}))
    drain(svc)
    assert sink.error is None, sink.error
    return sink.image


@pytest.mark.parametrize(
    "k,steer",
    [(2, dict(prompt=B)), (4, dict(prompt=B, negative_prompt=""))],
    ids=["prompt", "prompt-and-empty-negative"],
)
def test_a_steer_at_step_k_is_k_steps_of_a_then_b(svc, checkpoints, monkeypatch, loop, k, steer):
    """Against diffusers' StableDiffusionXLPipeline whose prompt embeddings (both rows, and the
    pooled text_embeds) are replaced after step k - 1 (callback_on_step_end); and the loop."""
    seed = 8
    served = steered(svc, k, steer, negative_prompt=NEGATIVE, seed=seed, steps=STEPS, guidance_scale=5.0)
    negative = steer.get("negative_prompt", NEGATIVE) or None
    cond, cond_pooled = loop.embed(steer["prompt"])
    uncond, uncond_pooled = loop.embed(negative)

    def swap(pipe, i, t, tensors):
        if i == k - 1:  # diffusers' rows: [uncond, cond]
            return {
                "prompt_embeds": torch.cat([uncond, cond]),
                "add_text_embeds": torch.cat([uncond_pooled, cond_pooled]),
            }
        return {}

    expected = reference(
        StableDiffusionXLPipeline,
        checkpoints[0],
        monkeypatch,
        "ddim",
        "default",
        seed,
        32,
        32,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
    )
    check(f"steer at step {k} ({', '.join(steer)}) vs diffusers", served, expected)
    written = loop.image(
        lambda i: (
            [PROMPT] if i < k else [steer["prompt"]],
            np.ones((1, 8, 8), np.float32),
            [NEGATIVE if i < k else negative],
            5.0,
        ),
        seed=seed,
    )
    check(f"steer at step {k} ({', '.join(steer)}) vs the loop", served, written)
    assert mean_abs(served, generate(svc, PROMPT, negative_prompt=NEGATIVE, seed=seed, steps=STEPS)) > 0


# --- the torch runner ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_models(checkpoints):
    from serving.models.torch_options import TorchOptions
    from serving.models.torch_runner import TorchModels

    return TorchModels(checkpoints[0], TorchOptions(), log=lambda *a: None)


@pytest.mark.parametrize("batch", [2, 5])
def test_torch_runner_components_match_onnx(repo, checkpoints, torch_models, batch):
    from serving.models.onnx import LocalModels
    from serving.models.torch_options import TorchOptions
    from serving.models.torch_runner import TorchModels

    onnx, onnx_inpaint = LocalModels(repo, model=MODEL), LocalModels(repo, model=MODEL, variant="inpaint")
    torch_inpaint = TorchModels(checkpoints[1], TorchOptions(), components=("unet",), log=lambda *a: None)
    rng = np.random.default_rng(batch)
    ids = {name: rng.integers(0, 40, (batch, 16)) for name in ("input_ids", "input_ids_2")}
    latent = (batch, 4, 8, 10)  # a non-square latent
    unet_inputs = dict(
        timestep=rng.uniform(0, 1000, batch).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, 16, 64), dtype=np.float32),
        text_embeds=rng.standard_normal((batch, 16), dtype=np.float32),
        time_ids=rng.integers(0, 64, (batch, 6)).astype(np.float32),
    )
    sample = rng.standard_normal(latent, dtype=np.float32)
    sample_9 = rng.standard_normal((batch, 9, 8, 10), dtype=np.float32)
    images = rng.random((batch, 32, 40, 3), dtype=np.float32)
    pairs = {
        f"encode_text {name}": (torch_models.encode_text(**ids)[name], onnx.encode_text(**ids)[name])
        for name in ("prompt_embeds", "text_embeds")
    }
    pairs["unet"] = (torch_models.unet(sample, **unet_inputs), onnx.unet(sample, **unet_inputs))
    pairs["unet 9-channel"] = (torch_inpaint.unet(sample_9, **unet_inputs), onnx_inpaint.unet(sample_9, **unet_inputs))
    pairs["decode"] = (torch_models.decode(sample), onnx.decode(sample))
    for i, (a, b) in enumerate(zip(torch_models.encode_image(images), onnx.encode_image(images))):
        pairs[f"encode_image[{i}]"] = (a, b)
    # the VAE with latent statistics: the torch runner's encoder is the family's too
    torch_stats = TorchModels(checkpoints[2], TorchOptions(), components=("vae",), log=lambda *a: None)
    onnx_stats = LocalModels(repo, model=STATS_MODEL)
    pairs["decode (latent statistics)"] = (torch_stats.decode(sample), onnx_stats.decode(sample))
    for i, (a, b) in enumerate(zip(torch_stats.encode_image(images), onnx_stats.encode_image(images))):
        pairs[f"encode_image[{i}] (latent statistics)"] = (a, b)
    for name, (got, expected) in pairs.items():
        assert got.shape == expected.shape and got.dtype == np.float32, name
        error = float(np.abs(got - expected).max())
        print(f"\ntorch vs ONNX batch {batch} {name}: max abs {error:.2e}")
        assert error <= 1e-4 * max(1.0, float(np.abs(expected).max())), name


def test_torch_runner_serves_the_tiny_sdxl(repo, svc, torch_models):
    from serving.core.service import PipelineAssets, PipelineService
    from serving.models.onnx import local_variants

    models = local_variants(repo)
    models[MODEL, "base"] = torch_models
    served = PipelineService(PipelineAssets.read(repo / "pipeline" / "1"), PipelineConfig(), models)
    for i, (prompt, fields) in enumerate(CROWD[:4]):  # txt2img (two sizes, three samplers, size fields), img2img
        by_torch, by_onnx = generate(served, prompt, **fields), generate(svc, prompt, **fields)
        check(f"torch runner vs ONNX runner, crowd request {i}", by_torch, by_onnx, limit=0.5 / 255)


# --- what the family declares for deployments ------------------------------------------------------


def test_the_sdxl_vae_stays_fp32_where_the_rest_builds_fp16(checkpoints, tiny_checkpoint, tmp_path):
    """force_upcast (diffusers' default; SDXL base's VAE overflows in FP16): the VAE's contracts say
    FP32, so TensorRT builds them without --fp16 and the torch runner on CUDA keeps them FP32; an
    "fp16-fix" VAE (force_upcast false) and SD's VAEs build FP16 as before."""
    from dataclasses import replace

    from export.tensorrt import trtexec_command
    from families.checkpoint import CheckpointInfo
    from families.contracts import component_contracts

    def fp16(info):
        contracts = component_contracts(
            info, 64, {k: 4 for k in ("text_encoder", "unet", "unet_regional", "vae_decoder", "vae_encoder")}
        )
        flags = {name: "--fp16" in trtexec_command(c, "m.onnx", "m.plan") for name, c in contracts.items()}
        assert flags == {name: c.fp16 for name, c in contracts.items()}
        return flags

    sdxl = CheckpointInfo.read(checkpoints[0])
    assert fp16(sdxl) == {"text_encoder": True, "unet": True, "vae_decoder": False, "vae_encoder": False}
    assert all(fp16(CheckpointInfo.read(tiny_checkpoint)).values())
    (tmp_path / "vae").mkdir()
    config = json.loads((checkpoints[0] / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert all(fp16(replace(sdxl, path=tmp_path)).values())


@pytest.mark.parametrize(
    "change,why",
    [
        ({"requires_aesthetics_score": True}, "requires_aesthetics_score"),
        ({"text_encoder": [None, None], "tokenizer": [None, None]}, "no text_encoder"),
    ],
)
def test_a_refiner_style_sdxl_checkpoint_is_refused_naming_why(checkpoints, tmp_path, change, why):
    """StableDiffusionXLImg2ImgPipeline folders like the SDXL refiner (5 time ids with an aesthetic
    score, one text encoder) are refused when read, not served with the wrong time ids."""
    from families.checkpoint import CheckpointInfo

    index = json.loads((checkpoints[0] / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline", **change})
    )
    with pytest.raises(ValueError, match=f"refiner-style pipeline \\({why}\\) is not served"):
        CheckpointInfo.read(tmp_path)


def test_previews_use_the_map_of_the_jobs_own_model(repo):
    """The models of one server have their own VAEs, so their own latent-to-RGB preview maps (the
    default model's map was used for every model's jobs)."""
    from serving.core.preview import LatentPreview
    from serving.core.service import model_infos

    maps = {
        model: LatentPreview.from_info(info)
        for model, info in model_infos(json.loads((repo / "pipeline" / "1" / "pipeline.json").read_text())).items()
    }
    svc = service(repo)
    made, real = [], svc.engine.preview
    svc.engine.preview = lambda latents, model: made.append((model, latents, real(latents, model))) or made[-1][2]
    sinks = [
        submit(svc, prompt, model=model, seed=2, steps=4, preview_every=2)
        for model, prompt in ((MODEL, PROMPT), (SD_MODEL, SD_PROMPT))
    ]
    drain(svc)
    assert all(s.error is None for s in sinks) and sorted(m for m, *_ in made) == [SD_MODEL, MODEL]
    for model, latents, preview in made:
        assert preview.tobytes() == maps[model](latents).tobytes(), model
        other = maps[SD_MODEL if model == MODEL else MODEL](latents)
        assert np.abs(preview.astype(int) - other).max() > 0  # the maps differ: the test can tell


def test_a_steer_is_checked_with_its_jobs_own_model(svc):
    """In a server whose default model is SDXL (no regional UNet), an SD job may be steered to
    regions in attention mode (its model has the regional UNet), and an SDXL job may not."""
    for model, prompt, accepted in ((SD_MODEL, SD_PROMPT, True), (MODEL, PROMPT, False)):
        sink = Sink()
        svc.submit(request_arrays(prompt, model=model, seed=3, steps=4, **REGIONS), sink, request_id=f"regions-{model}")
        svc.engine.run_iteration()
        inputs = {
            name: value
            for name, value in request_arrays("x", region_mode="attention", **REGIONS).items()
            if name != "prompt"
        }
        if accepted:
            assert svc.steer(f"regions-{model}", inputs) == 1
        else:
            with pytest.raises(InvalidInput) as refused:
                svc.steer(f"regions-{model}", inputs)
            assert refused.value.field == "region_mode"
        drain(svc)
        assert sink.error is None and sink.image is not None, sink.error


@pytest.mark.parametrize(
    "model,fields,code,field",
    [
        (SD_MODEL, dict(original_size=int2(64, 64)), INVALID_ARG, "original_size"),  # SDXL's fields only
        (MODEL, dict(crop_top_left=int2(-1, 0)), INVALID_ARG, "crop_top_left"),
        (MODEL, dict(target_size=np.array([32, 32, 1], np.int32)), INVALID_ARG, "target_size"),  # sent as is
        (MODEL, dict(task="upscale", init_image=photo(8, 1)), INVALID_ARG, "task"),  # no x4 upscaler for SDXL
        ("no-such-model", {}, "NOT_FOUND", "no-such-model"),
    ],
)
def test_what_a_model_does_not_serve_is_refused_naming_it(svc, model, fields, code, field):
    sink = Sink()
    svc.submit(
        {
            **request_arrays(
                PROMPT, model=model, seed=1, steps=2, **{k: v for k, v in fields.items() if k != "target_size"}
            ),
            **{k: v for k, v in fields.items() if k == "target_size"},
        },
        sink,
    )
    drain(svc)
    assert sink.error is not None and sink.error[0] == code and field in sink.error[1], sink.error


@pytest.mark.parametrize("model", [MODEL, BLEND_MODEL], ids=["9-channel", "latent-blend"])
def test_a_mask_steered_before_step_0_is_a_fresh_request_with_that_mask(svc, model):
    image, fields = photo(32, 3), dict(model=model, seed=4, steps=STEPS, guidance_scale=5.0, strength=0.8)
    sink = Sink()
    svc.submit(request_arrays(PROMPT, init_image=image, mask=half_mask(32), **fields), sink, request_id="mask")
    assert svc.steer("mask", {"mask": half_mask(32, "left")}) == 1
    drain(svc)
    assert sink.error is None, sink.error
    fresh = generate(svc, PROMPT, init_image=image, mask=half_mask(32, "left"), **fields)
    assert sink.image.tobytes() == fresh.tobytes()
    assert sink.image.tobytes() != generate(svc, PROMPT, init_image=image, mask=half_mask(32), **fields).tobytes()
