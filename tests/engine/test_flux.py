"""The Flux family (families/flux.py) served: the tiny random Flux (training/tiny_checkpoint.py kinds
"flux": guidance-distilled as FLUX.1-dev, and "flux-schnell") exported beside the tiny SD (the
default model) into one repository, and checked

- against diffusers 0.42.1's FluxPipeline, FluxImg2ImgPipeline and FluxInpaintPipeline given the
  same latents (txt2img with distilled guidance at several scales and sizes, square and not;
  true CFG with a negative prompt; schnell; img2img; latent-blend inpainting): <= 1/255 mean abs;
- for its rows: one UNet row per job with distilled guidance, two with true CFG;
- in a crowd of Flux (dev and schnell) and SD requests of different sizes, steps and guidance
  modes: each request's bytes equal what it gets alone, models never share a denoiser call;
- steered (prompt, guidance, a negative prompt that turns true CFG on) and with prompt
  schedules; refused fields (regions on Flux, SDXL's size fields on Flux, true_cfg_scale on SD);
  long prompts (CLIP truncates, T5's length refuses); previews by the model's own fit;
- run by the torch runner (ONNX parity at two batch sizes) and by a real tritonserver (gRPC
  streaming and HTTP unary), whose bytes equal the in-process service's.
Exports two Flux transformers (torch.export, ~20 s each on 2 cores) and the tiny SD once.

"The same latents": the service draws a seed's x_T from serving.core.sampler.noise_generator in
the unpacked shape (C, H/f, W/f); diffusers gets it packed 2x2 as FluxPipeline._pack_latents
packs (txt2img), or as the noise its randn_tensor draws (img2img, inpainting: those pipelines
noise the image latents themselves), with its VAE posterior samples replaced by the service's
draws from the seed's image stream (serving.core.sampler.image_noise_generator), as
tests/engine/test_image_parity.py does for SD.
"""

import itertools
import sys

import numpy as np
from PIL import Image
import pytest
import torch

from tests.support.image_inputs import Sink, drain, generate, half_mask, photo, service, submit
from serving.client.kserve import request_arrays
from serving.core.sampler import image_noise_generator, noise_generator

PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
MAX_MEAN_ABS = 1 / 255
T5_LENGTH = 24  # the tiny Flux's T5 tokenizer length (training/tiny_checkpoint.py FLUX_T5_LENGTH)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_checkpoint(tmp_path_factory):
    from training.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("flux") / "flux", kind="flux")


@pytest.fixture(scope="module")
def schnell_checkpoint(tmp_path_factory):
    from training.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("flux") / "schnell", kind="flux-schnell")


@pytest.fixture(scope="module")
def flux_repo(tmp_path_factory, tiny_checkpoint, flux_checkpoint, schnell_checkpoint):
    """The tiny SD as the default model "sd" (as the shipped model would be), the tiny Flux as
    "flux" and the tiny schnell as "schnell", exported up to 64 px."""
    from export.cli import pipeline_parameters
    from export.repository import write_repository

    repo = tmp_path_factory.mktemp("flux-repo") / "model_repository"
    write_repository(
        tiny_checkpoint,
        repo,
        pipeline_parameters=pipeline_parameters(),
        log=lambda *a: None,
        max_size=64,
        name="sd",
        models={"flux": flux_checkpoint, "schnell": schnell_checkpoint},
    )
    return repo


@pytest.fixture(scope="module")
def svc(flux_repo):
    return service(flux_repo)


@pytest.fixture(scope="module")
def pipes(flux_checkpoint, schnell_checkpoint):
    """diffusers' pipelines over the tiny checkpoints, loaded once."""
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

    dev = FluxPipeline.from_pretrained(flux_checkpoint)
    out = {
        "dev": dev,
        "schnell": FluxPipeline.from_pretrained(schnell_checkpoint),
        "img2img": FluxImg2ImgPipeline(**dev.components),
        "inpaint": FluxInpaintPipeline(**dev.components),
    }
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


# --- references -------------------------------------------------------------------------------


def x_t(seed, height, width) -> np.ndarray:
    """The service's x_T for a seed: the PCG64 draw in the unpacked latent shape."""
    return noise_generator(seed).standard_normal((4, height // 4, width // 4), dtype=np.float32)


def packed(latents: np.ndarray) -> torch.Tensor:
    """[C, h, w] -> [1, h/2 * w/2, 4C], as FluxPipeline._pack_latents."""
    c, h, w = latents.shape
    t = torch.from_numpy(latents)[None].view(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(1, (h // 2) * (w // 2), c * 4)


def to_bytes(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.uint8)


def reference(pipe, monkeypatch=None, noises=(), posteriors=(), **call) -> np.ndarray:
    """uint8 image from `pipe`; for the image pipelines, its randn_tensor draws are replaced by
    `noises` and its VAE posterior samples (retrieve_latents) by mean + std x `posteriors`, in
    call order (zeros once they run out: FluxInpaintPipeline encodes the masked image too, for
    64-channel transformers only)."""
    if monkeypatch is not None:
        module = sys.modules[type(pipe).__module__]
        noises, posteriors = [torch.from_numpy(n) for n in noises], [torch.from_numpy(p) for p in posteriors]
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: noises.pop(0).reshape(shape))

        def sample(output, generator=None, sample_mode="sample"):
            eps = posteriors.pop(0) if posteriors else torch.zeros_like(output.latent_dist.mean[0])
            return output.latent_dist.mean + output.latent_dist.std * eps[None]

        monkeypatch.setattr(module, "retrieve_latents", sample)
    with torch.no_grad():
        return to_bytes(pipe(max_sequence_length=T5_LENGTH, output_type="np", **call).images[0])


def mean_abs(a, b) -> float:
    """Mean |a - b| over uint8 images, in units of 1/255."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# --- 1. exactness vs diffusers ----------------------------------------------------------------

TXT2IMG = [  # (model, seed, steps, height, width, guidance_scale, negative_prompt, true_cfg_scale)
    ("flux", 1, 4, 32, 32, 3.5, None, None),
    ("flux", 2, 6, 48, 48, 1.0, None, None),
    ("flux", 3, 5, 32, 64, 7.0, None, None),
    ("flux", 4, 4, 64, 48, 2.0, None, None),
    ("flux", 5, 4, 32, 32, 3.5, NEGATIVE, 4.0),  # true CFG: two rows
    ("flux", 6, 5, 48, 32, 2.5, NEGATIVE, 2.0),
    ("flux", 7, 4, 32, 32, 3.5, NEGATIVE, 1.0),  # a negative prompt without true CFG: one row, ignored
    ("schnell", 8, 3, 32, 32, 0.0, None, None),
    ("schnell", 9, 2, 64, 32, 3.5, None, None),  # schnell ignores guidance_scale
    ("schnell", 10, 3, 32, 32, 0.0, NEGATIVE, 3.0),  # true CFG without a guidance input
]


@pytest.mark.parametrize("model, seed, steps, height, width, guidance, negative, true_cfg", TXT2IMG)
def test_txt2img_matches_flux_pipeline(svc, pipes, model, seed, steps, height, width, guidance, negative, true_cfg):
    fields = dict(model=model, seed=seed, steps=steps, height=height, width=width, guidance_scale=guidance)
    if negative is not None:
        fields.update(negative_prompt=negative, true_cfg_scale=true_cfg)
    served = generate(svc, PROMPT, **fields)
    assert served.shape == (height, width, 3)
    expected = reference(
        pipes["dev" if model == "flux" else "schnell"],
        prompt=PROMPT,
        negative_prompt=negative,
        true_cfg_scale=true_cfg or 1.0,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=packed(x_t(seed, height, width)),
    )
    diff = mean_abs(served, expected)
    print(
        f"\n{model} txt2img {height}x{width} steps {steps} guidance {guidance} true_cfg {true_cfg}: mean abs {diff:.4f}/255 "
        f"(max {np.abs(served.astype(int) - expected).max()})"
    )
    assert diff <= MAX_MEAN_ABS * 255


def test_long_prompts_truncate_for_clip_and_are_refused_past_t5s_length(svc, pipes):
    """As FluxPipeline: CLIP reads the first 16 tokens (the tiny CLIP's length; 77 for FLUX.1),
    T5 the whole prompt; only T5's length (24 here, 512 for FLUX.1) refuses a prompt."""
    long = "a large red circle on the left of a small blue square at the top with a green triangle below the star"
    assert len(pipes["dev"].tokenizer(long).input_ids) > 16
    served = generate(svc, long, model="flux", seed=3, steps=4, height=32, width=32)
    expected = reference(
        pipes["dev"],
        prompt=long,
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=3.5,
        latents=packed(x_t(3, 32, 32)),
    )
    diff = mean_abs(served, expected)
    print(f"\nflux txt2img with a prompt CLIP truncates: mean abs {diff:.4f}/255")
    assert diff <= MAX_MEAN_ABS * 255
    sink = submit(svc, long + " and a cat", model="flux", seed=3, steps=4)
    assert sink.error[0] == "INVALID_ARG" and sink.error[1].startswith("prompt: is 27 tokens long; at most 24"), (
        sink.error
    )


@pytest.mark.parametrize(
    "seed, steps, size, strength, guidance, negative",
    [
        (11, 10, 32, 0.6, 3.5, None),
        (12, 10, 48, 0.65, 2.0, None),  # steps x strength not whole: FluxImg2ImgPipeline keeps 7 steps
        (13, 7, 32, 0.3, 3.5, NEGATIVE),
    ],
)
def test_img2img_matches_flux_img2img_pipeline(
    svc, pipes, monkeypatch, seed, steps, size, strength, guidance, negative
):
    image = photo(size, seed)
    fields = dict(model="flux", init_image=image, strength=strength, seed=seed, steps=steps, guidance_scale=guidance)
    if negative is not None:
        fields.update(negative_prompt=negative, true_cfg_scale=3.0)
    served = generate(svc, PROMPT, **fields)
    posterior = image_noise_generator(seed).standard_normal((4, size // 4, size // 4), dtype=np.float32)
    expected = reference(
        pipes["img2img"],
        monkeypatch,
        [x_t(seed, size, size)],
        [posterior],
        prompt=PROMPT,
        negative_prompt=negative,
        true_cfg_scale=3.0 if negative else 1.0,
        image=Image.fromarray(image),
        strength=strength,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance,
    )
    diff = mean_abs(served, expected)
    print(f"\nflux img2img {size}px steps {steps} strength {strength}: mean abs {diff:.4f}/255")
    assert diff <= MAX_MEAN_ABS * 255
    assert mean_abs(served, image) > 1  # it did change the image


@pytest.mark.parametrize("seed, steps, strength", [(21, 8, 1.0), (22, 10, 0.7)])
def test_latent_blend_inpainting_matches_flux_inpaint_pipeline(svc, pipes, monkeypatch, seed, steps, strength):
    size = 32
    image, mask = photo(size, seed), half_mask(size, "left")
    served = generate(
        svc,
        PROMPT,
        model="flux",
        init_image=image,
        mask=mask,
        strength=strength,
        keep_unmasked=False,
        seed=seed,
        steps=steps,
        guidance_scale=3.5,
    )
    posterior = image_noise_generator(seed).standard_normal((4, size // 4, size // 4), dtype=np.float32)
    expected = reference(
        pipes["inpaint"],
        monkeypatch,
        [x_t(seed, size, size)],
        [posterior],
        prompt=PROMPT,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask),
        strength=strength,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=3.5,
    )
    diff = mean_abs(served, expected)
    print(f"\nflux latent-blend inpainting steps {steps} strength {strength}: mean abs {diff:.4f}/255")
    assert diff <= MAX_MEAN_ABS * 255
    kept = generate(
        svc,
        PROMPT,
        model="flux",
        init_image=image,
        mask=mask,
        strength=strength,
        seed=seed,
        steps=steps,
        guidance_scale=3.5,
    )
    assert np.array_equal(kept[:, size // 2 :], image[:, size // 2 :])  # keep_unmasked: the input outside the mask


# --- 2. one row per job -----------------------------------------------------------------------


class Recording:
    """Wraps a runner's models: logs every denoiser call as (model, variant, rows, its inputs)."""

    def __init__(self, models, key, log):
        self.models, self.key, self.log = models, key, log

    def __getattr__(self, name):
        return getattr(self.models, name)

    def unet(self, sample, timestep, encoder_hidden_states, **extra):
        self.log.append((*self.key, sample.shape[0], {"sample": sample, "timestep": timestep, **extra}))
        return self.models.unet(sample, timestep, encoder_hidden_states, **extra)


def recording(repo, log, **params):
    svc = service(repo, **params)
    for key, runner in svc.engine.runner.runners.items():
        runner.models = Recording(runner.models, key, log)
    return svc


@pytest.mark.parametrize(
    "model, fields, rows",
    [
        ("flux", dict(guidance_scale=3.5), 1),
        ("flux", dict(guidance_scale=3.5, negative_prompt=NEGATIVE), 1),  # a negative prompt alone: no true CFG
        ("flux", dict(guidance_scale=3.5, negative_prompt=NEGATIVE, true_cfg_scale=4.0), 2),
        ("schnell", dict(guidance_scale=3.5), 1),
        ("sd", dict(guidance_scale=5.0), 2),  # SD's classifier-free guidance, for contrast
    ],
    ids=["distilled", "negative-alone", "true-cfg", "schnell", "sd"],
)
def test_rows_per_job(flux_repo, model, fields, rows):
    log = []
    svc = recording(flux_repo, log)
    generate(svc, PROMPT, model=model, seed=1, steps=4, height=32, width=32, **fields)
    assert (svc.engine.stats.steps, svc.engine.stats.rows) == (4, 4 * rows)
    assert [(m, v, n) for m, v, n, _ in log] == [(model, "base", rows)] * 4
    inputs = log[0][3]
    if model == "flux":  # the distilled guidance, one per row: guidance_scale, not true_cfg_scale
        np.testing.assert_array_equal(inputs["guidance"], np.full(rows, 3.5, np.float32))
        assert inputs["pooled_projections"].shape == (rows, 32)
    else:
        assert "guidance" not in inputs


# --- 3. a crowd -------------------------------------------------------------------------------

CROWD = [  # (prompt, fields): Flux dev (distilled, true CFG, img2img), schnell and SD, sizes and steps mixed
    ("a red circle", dict(model="flux", seed=31, steps=6, height=32, width=32, guidance_scale=3.5)),
    ("a blue square", dict(model="flux", seed=32, steps=4, height=48, width=48, guidance_scale=2.0)),
    (
        "a green star",
        dict(
            model="flux",
            seed=33,
            steps=5,
            height=32,
            width=32,
            guidance_scale=4.0,
            negative_prompt=NEGATIVE,
            true_cfg_scale=3.0,
        ),
    ),
    ("a yellow circle", dict(model="flux", seed=34, steps=3, height=32, width=64, guidance_scale=1.5)),
    (
        "a purple square",
        dict(model="flux", seed=35, steps=8, init_image=photo(32, 35), strength=0.65, guidance_scale=3.5),
    ),
    ("a cat", dict(model="schnell", seed=36, steps=2, height=32, width=32)),
    ("a dog", dict(model="schnell", seed=37, steps=4, height=48, width=48)),
    ("a white star", dict(model="flux", seed=38, steps=7, height=32, width=32, guidance_scale=3.5)),
    ("a red circle on the left", dict(seed=39, steps=5, height=32, width=32, guidance_scale=5.0)),  # SD, the default
    ("a horse", dict(model="schnell", seed=40, steps=3, height=32, width=32)),
]


class CallCounter(Sink):
    """Records the engine's step count at each of its job's steps."""

    def __init__(self, engine):
        super().__init__()
        self.engine, self.calls = engine, []

    def progress(self, step, total, preview, steer_applied=()):
        self.calls.append(self.engine.stats.steps)


def test_a_crowd_of_flux_requests_gets_what_each_gets_alone(svc, flux_repo):
    alone = [generate(svc, prompt, **fields) for prompt, fields in CROWD]
    log = []
    crowd = recording(flux_repo, log)
    sinks = [CallCounter(crowd.engine) for _ in CROWD]
    for (prompt, fields), sink in list(zip(CROWD, sinks))[:5]:
        crowd.submit(request_arrays(prompt, progress_every=1, **fields), sink)
    for _ in range(2):  # the first half is mid-flight when the rest arrive
        crowd.engine.run_iteration()
    for (prompt, fields), sink in list(zip(CROWD, sinks))[5:]:
        crowd.submit(request_arrays(prompt, progress_every=1, **fields), sink)
    drain(crowd)
    for (prompt, fields), sink, image in zip(CROWD, sinks, alone):
        assert sink.error is None, sink.error
        assert sink.image.tobytes() == image.tobytes(), (prompt, fields)
    stats, steps = crowd.engine.stats, sum(len(s.calls) + 1 for s in sinks)  # progress is not reported at the last step
    print(f"\ncrowd of {len(CROWD)}: {stats.steps} denoiser calls, {stats.rows} rows (alone: {steps} calls)")
    # batched: calls held several jobs' rows; each call is one model's (the runner of one (model, variant))
    assert stats.steps < steps
    assert {m for m, _, _, _ in log} == {"flux", "schnell", "sd"} and max(rows for _, _, rows, _ in log) >= 3
    inputs = {
        "flux": {"sample", "timestep", "pooled_projections", "guidance"},
        "schnell": {"sample", "timestep", "pooled_projections"},
        "sd": {"sample", "timestep"},
    }
    assert all(set(call) == inputs[model] for model, _, _, call in log)  # no call mixes models' inputs
    # fairness: every job steps at least once in every len(CROWD) calls from its first step on,
    # and the late arrivals' first steps come within len(CROWD) calls of their arrival
    for sink in sinks:
        assert all(b - a <= len(CROWD) for a, b in zip(sink.calls, sink.calls[1:])), sink.calls
    assert max(s.calls[0] for s in sinks) <= 2 + len(CROWD)


# --- 4. steering, prompt schedules, refused fields --------------------------------------------

A, B = "a red circle on the left", "a blue square at the top"
STEER_STEPS = 6
JOB_IDS = itertools.count()


def steer_arrays(**fields) -> dict:
    """A steer's inputs: the named fields alone, typed as a request's."""
    return {
        k: v
        for k, v in request_arrays(
            fields.get("prompt", "x"), **{k: v for k, v in fields.items() if k != "prompt"}
        ).items()
        if k in fields
    }


def steered(svc, prompt, steer_at=None, steer=None, **fields) -> Sink:
    """One Flux job, steered with `steer` (request fields) after `steer_at` steps (0: before admission)."""
    sink, job = Sink(), f"job-{next(JOB_IDS)}"
    fields = {
        "model": "flux",
        "seed": 7,
        "steps": STEER_STEPS,
        "height": 32,
        "width": 32,
        "guidance_scale": 3.5,
        **fields,
    }
    svc.submit(request_arrays(prompt, **fields), sink, request_id=job)
    if steer_at is not None:
        while svc.engine.registry.running[job].index < steer_at:
            assert svc.engine.run_iteration()
        svc.steer(job, steer_arrays(**steer))
    drain(svc)
    assert sink.error is None, sink.error
    return sink


def switched_reference(pipe, plan, steps=STEER_STEPS, seed=7, size=32) -> np.ndarray:
    """FluxPipeline's image for `A`, with the transformer's conditioning of step i replaced by
    plan(i) -> (prompt, guidance): one transformer call per step (distilled guidance)."""
    embeds = {}

    def encoded(prompt):
        if prompt not in embeds:
            embeds[prompt] = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=T5_LENGTH)[:2]
        return embeds[prompt]

    step = iter(range(steps))

    def swap(module, args, kwargs):
        prompt, guidance = plan(next(step))
        kwargs["encoder_hidden_states"], kwargs["pooled_projections"] = encoded(prompt)
        kwargs["guidance"] = torch.full_like(kwargs["guidance"], guidance)
        return args, kwargs

    handle = pipe.transformer.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        return reference(
            pipe,
            prompt=A,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=3.5,
            latents=packed(x_t(seed, size, size)),
        )
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "k, steer",
    [(2, dict(prompt=B)), (3, dict(guidance_scale=7.0)), (4, dict(prompt=B, guidance_scale=1.5))],
    ids=["prompt", "guidance", "both"],
)
def test_steering_a_flux_job_equals_k_steps_of_a_then_b(svc, pipes, k, steer):
    served = steered(svc, A, steer_at=k, steer=steer).image
    expected = switched_reference(
        pipes["dev"], lambda i: (A, 3.5) if i < k else (steer.get("prompt", A), steer.get("guidance_scale", 3.5))
    )
    unsteered = switched_reference(pipes["dev"], lambda i: (A, 3.5))
    diff = mean_abs(served, expected)
    print(
        f"\nflux steered at step {k} with {steer}: mean abs {diff:.4f}/255 vs FluxPipeline switched at {k} "
        f"({mean_abs(served, unsteered):.2f}/255 from the unsteered image)"
    )
    assert diff <= MAX_MEAN_ABS * 255
    # the tiny random model barely reads its text (the steer moves the image by < 1/255): the
    # reference must still be far closer than the unsteered image
    assert 10 * diff < mean_abs(served, unsteered)


def test_steer_before_step_0_equals_a_fresh_request(svc):
    steer = dict(prompt=B, guidance_scale=5.0)
    assert (
        steered(svc, A, steer_at=0, steer=steer).image.tobytes() == steered(svc, B, guidance_scale=5.0).image.tobytes()
    )


def test_prompt_schedules_equal_the_live_steer(svc, pipes):
    k = 3
    live = steered(svc, A, steer_at=k, steer=dict(prompt=B)).image
    assert steered(svc, f"[{A}:{B}:{k}]").image.tobytes() == live.tobytes()
    assert steered(svc, f"[{A}:{B}:0.5]").image.tobytes() == live.tobytes()  # floor(0.5 x 6) = 3
    alternating = steered(svc, "a [red|blue] circle").image
    expected = switched_reference(pipes["dev"], lambda i: ("a red circle" if i % 2 == 0 else "a blue circle", 3.5))
    assert mean_abs(alternating, expected) <= MAX_MEAN_ABS * 255


def test_a_negative_prompt_steer_turns_true_cfg_on_from_that_step(svc):
    """true_cfg_scale with no negative prompt is one row; a steer that gives one adds its row
    from the step it applies (a negative-prompt schedule does the same)."""
    log = []
    for runner in svc.engine.runner.runners.values():
        runner.models = Recording(runner.models, ("?", "?"), log)
    try:
        live = steered(svc, A, steer_at=2, steer=dict(negative_prompt=NEGATIVE), true_cfg_scale=4.0)
        assert [rows for _, _, rows, _ in log] == [1, 1, 2, 2, 2, 2]
        scheduled = steered(svc, A, negative_prompt=f"[:{NEGATIVE}:2]", true_cfg_scale=4.0)
    finally:
        for runner in svc.engine.runner.runners.values():
            runner.models = runner.models.models
    assert scheduled.image.tobytes() == live.image.tobytes()
    assert live.image.tobytes() != steered(svc, A, true_cfg_scale=4.0).image.tobytes()


@pytest.mark.parametrize(
    "model, fields, name",
    [
        ("flux", dict(region_prompts=["a red circle", "a blue square"], region_divisions="1,1"), "region_prompts"),
        ("schnell", dict(region_prompts=["a red circle", "a blue square"], region_divisions="1,1"), "region_prompts"),
        ("flux", dict(original_size=np.array([64, 64], np.int32)), "original_size"),
        ("flux", dict(crop_top_left=np.array([0, 0], np.int32)), "crop_top_left"),
        ("sd", dict(true_cfg_scale=4.0, negative_prompt=NEGATIVE), "true_cfg_scale"),
    ],
)
def test_fields_the_family_does_not_read_are_refused(svc, model, fields, name):
    sink = submit(svc, PROMPT, model=model, seed=1, steps=2, **fields)
    assert sink.error is not None and sink.error[0] == "INVALID_ARG" and sink.error[1].startswith(name), sink.error


def test_a_region_steer_of_a_flux_job_is_refused(svc):
    from serving.core.request import InvalidInput

    sink = Sink()
    svc.submit(request_arrays(A, model="flux", seed=1, steps=4, height=32, width=32), sink, request_id="regions")
    svc.engine.run_iteration()
    with pytest.raises(InvalidInput) as refused:
        svc.steer("regions", steer_arrays(region_prompts=["a red circle", "a blue square"], region_divisions="1,1"))
    assert refused.value.field == "region_prompts"
    drain(svc)
    assert sink.image is not None


def test_a_flux_job_is_previewed_by_its_own_models_fit(svc, flux_repo):
    import json

    from serving.core.preview import LatentPreview

    models = json.loads((flux_repo / "pipeline" / "1" / "pipeline.json").read_text())["models"]
    flux, sd = LatentPreview.from_info(models["flux"]), LatentPreview.from_info(models["sd"])
    seen = []
    real = svc.engine.preview
    svc.engine.preview = lambda latents, model: seen.append((latents.copy(), model)) or real(latents, model)
    try:
        sink = CallCounter(svc.engine)
        sink.previews = []
        sink.progress = lambda step, total, preview, steer_applied=(): sink.previews.append(preview)
        svc.submit(request_arrays(A, model="flux", seed=1, steps=3, height=32, width=32, preview_every=1), sink)
        drain(svc)
    finally:
        svc.engine.preview = real
    assert len(sink.previews) == 2 and [m for _, m in seen] == ["flux", "flux"]
    for preview, (latents, _) in zip(sink.previews, seen):
        assert preview.tobytes() == flux(latents).tobytes() != sd(latents).tobytes()


# --- 5. the torch runner ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_flux(flux_checkpoint):
    from serving.models.torch_options import TorchOptions
    from serving.models.torch_runner import TorchModels

    return TorchModels(flux_checkpoint, TorchOptions(device="cpu"), log=lambda *a: None)


def test_torch_runner_matches_the_onnx_models(torch_flux, flux_repo):
    """Each call at two batch sizes (CPU buckets: 1 pads to 4, 5 to 8), with the guidance and
    pooled inputs by name, as the engine passes them."""
    from serving.models.onnx import local_variants

    onnx = local_variants(flux_repo)["flux", "base"]
    rng = np.random.default_rng(3)
    worst = {}
    for rows, (h, w) in ((1, (8, 8)), (5, (8, 16))):
        ids = {"input_ids": rng.integers(0, 40, (rows, 16)), "input_ids_2": rng.integers(0, 40, (rows, T5_LENGTH))}
        unet = dict(
            sample=rng.standard_normal((rows, 4, h, w), dtype=np.float32),
            timestep=rng.uniform(0, 1000, rows).astype(np.float32),
            encoder_hidden_states=rng.standard_normal((rows, T5_LENGTH, 48), dtype=np.float32),
            pooled_projections=rng.standard_normal((rows, 32), dtype=np.float32),
            guidance=rng.uniform(1, 8, rows).astype(np.float32),
        )
        latents = rng.standard_normal((rows, 4, h, w), dtype=np.float32)
        images = rng.random((rows, 4 * h, 4 * w, 3), dtype=np.float32)
        text_t, text_o = torch_flux.encode_text(**ids), onnx.encode_text(**ids)
        pairs = {f"encode_text.{k}": (text_t[k], text_o[k]) for k in ("prompt_embeds", "pooled_projections")}
        pairs["unet"] = (torch_flux.unet(**unet), onnx.unet(**unet))
        pairs["decode"] = (torch_flux.decode(latents), onnx.decode(latents))
        for i, (a, b) in enumerate(zip(torch_flux.encode_image(images), onnx.encode_image(images))):
            pairs[f"encode_image[{i}]"] = (a, b)
        for name, (got, expected) in pairs.items():
            assert got.shape == expected.shape and got.dtype == np.float32, (name, got.shape, expected.shape)
            err = float(np.abs(got - expected).max())
            worst[name, rows] = err
            assert err <= 1e-4 * max(1.0, float(np.abs(expected).max())), (name, rows, err)
    print("\nflux torch runner vs ONNX, max abs: " + ", ".join(f"{n} x{r}: {e:.2g}" for (n, r), e in worst.items()))


def test_torch_runner_serves_flux_beside_onnx_sd(torch_flux, flux_repo, svc):
    """The flux model's runner swapped for the torch runner: its images within 1/255 of ONNX's."""
    from serving.core.config import PipelineConfig
    from serving.core.service import PipelineAssets, PipelineService
    from serving.models.onnx import local_variants

    models = {**local_variants(flux_repo), ("flux", "base"): torch_flux}
    mixed = PipelineService(PipelineAssets.read(flux_repo / "pipeline" / "1"), PipelineConfig.parse({}), models)
    for fields in (dict(guidance_scale=3.5), dict(guidance_scale=2.0, negative_prompt=NEGATIVE, true_cfg_scale=3.0)):
        fields = dict(model="flux", seed=5, steps=4, height=32, width=48, **fields)
        diff = mean_abs(generate(mixed, PROMPT, **fields), generate(svc, PROMPT, **fields))
        print(f"\nflux torch runner vs ONNX image {fields}: mean abs {diff:.4f}/255")
        assert diff <= MAX_MEAN_ABS * 255


# --- 6. through tritonserver ------------------------------------------------------------------


def test_tritonserver_serves_sd_and_flux_side_by_side(flux_repo, svc, triton_servers):
    from serving.client.kserve import LdmClient

    fields = dict(seed=3, steps=4, height=32, width=48, guidance_scale=3.5)
    cases = {
        "flux": dict(model="flux", **fields),
        "flux-true-cfg": dict(model="flux", negative_prompt=NEGATIVE, true_cfg_scale=3.0, **fields),
        "schnell": dict(model="schnell", seed=4, steps=2, height=32, width=32),
        "sd": dict(seed=5, steps=4, height=32, width=32, guidance_scale=5.0),
    }
    expected = {name: generate(svc, PROMPT, **case) for name, case in cases.items()}
    with triton_servers.running(flux_repo, "tritonserver-flux") as server:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            client = LdmClient(url, protocol=protocol)
            try:
                for name, case in cases.items():
                    image = client.generate(PROMPT, **case)
                    assert image.tobytes() == expected[name].tobytes(), (protocol, name)
            finally:
                client.close()
