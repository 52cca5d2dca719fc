"""Samplers in the engine, in this process (ONNX Runtime), byte for byte:
- a crowd of 8 requests with 8 different samplers or schedules and step counts, half of them
  joining while the others run, gives each request the image it gets alone;
- every sampler works with every task and feature (a matrix, not one pair): prompt schedules,
  img2img, inpainting (9-channel UNet), upscaling, regional prompts, a steer before step 0 (equal
  to a fresh request with the steered values), each alone equal to inside a mixed crowd;
- steers of regions, of a latent-blend inpainting mask and of the prompt and guidance after 3
  steps, per sampler: each steered job alone equals itself steered inside a crowd;
- a guidance interval runs the conditional row alone outside it (fewer UNet rows, counted),
  and the whole-run interval changes nothing."""

import numpy as np
import pytest

from tests.support.image_inputs import Sink, drain, half_mask, photo, service, submit
from serving.client.kserve import request_arrays

PROMPT = "a large red circle on the left"
SAMPLERS = [
    ("ddim", "default"),
    ("euler", "default"),
    ("euler_ancestral", "default"),
    ("dpmpp_2m", "karras"),
    ("dpmpp_2m_sde", "default"),
    ("unipc", "default"),
    ("lcm", "default"),
    ("dpmpp_2m", "default"),
]
TASKS = {
    "schedule": dict(prompt="[a red circle:a blue square:4] on the left", steps=9),
    "img2img": dict(init_image=photo(32, 1), strength=0.6, steps=12),
    "inpaint": dict(init_image=photo(32, 1), mask=half_mask(32), steps=10),
    "upscale": dict(task="upscale", init_image=photo(8, 2), noise_level=40, steps=8),
    "regions": dict(region_prompts=["a red circle", "a blue square"], region_divisions="1,1", steps=8),
}


@pytest.fixture(scope="module")
def svc(variant_repo):
    return service(variant_repo)


def run_alone(svc, prompt=PROMPT, **fields) -> np.ndarray:
    sink = submit(svc, prompt, **fields)
    drain(svc)
    assert sink.error is None, sink.error
    return sink.image


def test_eight_samplers_in_one_crowd_equal_each_alone(svc):
    requests = [
        dict(sampler=s, sigma_schedule=k, steps=n, seed=40 + i, guidance_scale=5.0)
        for i, ((s, k), n) in enumerate(zip(SAMPLERS, [25, 10, 15, 20, 12, 18, 6, 14]))
    ]
    alone = [run_alone(svc, **r) for r in requests]
    sinks = [submit(svc, PROMPT, **r) for r in requests[:4]]
    for _ in range(3):  # the first four are running when the others arrive
        assert svc.engine.run_iteration()
    sinks += [submit(svc, PROMPT, **r) for r in requests[4:]]
    drain(svc)
    for sink, image, r in zip(sinks, alone, requests):
        assert sink.error is None, sink.error
        assert sink.image.tobytes() == image.tobytes(), r
    assert len({image.tobytes() for image in alone}) == len(alone)


@pytest.mark.parametrize("sampler,schedule", SAMPLERS[:7])
def test_every_task_works_with_every_sampler_alone_and_in_a_crowd(svc, sampler, schedule):
    requests = {
        task: dict(fields, sampler=sampler, sigma_schedule=schedule, seed=i, guidance_scale=5.0)
        for i, (task, fields) in enumerate(TASKS.items())
    }
    alone = {task: run_alone(svc, **{"prompt": PROMPT, **r}) for task, r in requests.items()}
    for task, image in alone.items():
        assert np.isfinite(image).all() and image.std() > 1.0, task
    sinks = {task: submit(svc, **{"prompt": PROMPT, **r}) for task, r in requests.items()}
    drain(svc)
    for task, sink in sinks.items():
        assert sink.error is None, (task, sink.error)
        assert sink.image.tobytes() == alone[task].tobytes(), task


@pytest.mark.parametrize("sampler,schedule", SAMPLERS[:7])
def test_a_steer_before_step_0_equals_a_fresh_request_with_every_sampler(svc, sampler, schedule):
    fields = dict(sampler=sampler, sigma_schedule=schedule, seed=5, steps=8, guidance_scale=5.0)
    fresh = run_alone(svc, "a blue square at the top", **{**fields, "guidance_scale": 3.0})
    sink = Sink()
    svc.submit(request_arrays(PROMPT, **fields), sink, request_id="steered")
    svc.steer(
        "steered",
        {"prompt": np.array([b"a blue square at the top"], object), "guidance_scale": np.array([3.0], np.float32)},
    )
    drain(svc)
    assert sink.error is None, sink.error
    assert sink.image.tobytes() == fresh.tobytes()


def test_guidance_interval_leaves_out_unconditional_rows_outside_it(svc):
    fields = dict(sampler="dpmpp_2m", seed=9, steps=10, guidance_scale=5.0)
    whole = run_alone(svc, **fields)
    assert run_alone(svc, guidance_interval=np.array([0.0, 1.0], np.float32), **fields).tobytes() == whole.tobytes()
    rows, saved = svc.engine.stats.rows, svc.engine.stats.rows_saved
    middle = run_alone(svc, guidance_interval=np.array([0.2, 0.8], np.float32), **fields)
    # steps 0, 1, 8, 9 of 10 run the conditional row alone: 16 rows instead of 20
    assert svc.engine.stats.rows - rows == 16
    assert svc.engine.stats.rows_saved - saved == 4
    assert middle.tobytes() != whole.tobytes()
    unguided = run_alone(svc, **{**fields, "guidance_scale": 1.0})
    assert run_alone(svc, guidance_interval=np.array([0.0, 0.1], np.float32), **fields).tobytes() != unguided.tobytes()
    sink = submit(svc, PROMPT, guidance_interval=np.array([0.6, 0.2], np.float32), **fields)
    assert sink.error is not None and sink.error[1].startswith("guidance_interval:")


@pytest.fixture(scope="module")
def base_svc(tiny_repo):
    return service(tiny_repo)  # no inpainting UNet: inpainting by latent blend


STEERED = {  # request fields, and what a steer after 3 steps changes
    "regions": (
        dict(region_prompts=["a red circle", "a blue square"], region_divisions="1,1"),
        dict(region_prompts=["a cat", "a green triangle", "a dog"], region_divisions="1,1,1"),
    ),
    "mask": (dict(init_image=photo(32, 1), mask=half_mask(32), strength=0.8), dict(mask=half_mask(32, "left"))),
    "prompt": (dict(), dict(prompt="a blue square at the top", guidance_scale=2.0)),
}


def steer_arrays(**fields):
    arrays = request_arrays(fields.pop("prompt", ""), **fields)
    if not arrays["prompt"][0]:
        del arrays["prompt"]
    return arrays


def run_steered(svc, requests: dict) -> dict:
    """Runs `requests` ({id: (fields, steer)}) together, steering each once it has done 3 steps."""
    sinks = {}
    for request_id, (fields, _) in requests.items():
        sinks[request_id] = Sink()
        svc.submit(request_arrays(PROMPT, **fields), sinks[request_id], request_id=request_id)
    pending = dict(requests)
    while pending:
        assert svc.engine.run_iteration()
        for request_id, (_, steer) in list(pending.items()):
            job = svc.engine.registry.running.get(request_id)
            if job is not None and job.index >= 3:
                svc.steer(request_id, steer_arrays(**steer))
                del pending[request_id]
    drain(svc)
    for request_id, sink in sinks.items():
        assert sink.error is None, (request_id, sink.error)
    return {request_id: sink.image for request_id, sink in sinks.items()}


@pytest.mark.parametrize("sampler,schedule", SAMPLERS[:7])
def test_steers_of_regions_mask_and_prompt_mid_run_with_every_sampler(base_svc, sampler, schedule):
    """With latent-blend inpainting: each steered job alone equals itself steered at the same step
    inside a crowd of the others."""
    requests = {
        kind: (dict(fields, sampler=sampler, sigma_schedule=schedule, seed=i, steps=9, guidance_scale=5.0), steer)
        for i, (kind, (fields, steer)) in enumerate(STEERED.items())
    }
    alone = {kind: run_steered(base_svc, {kind: request})[kind] for kind, request in requests.items()}
    together = run_steered(base_svc, requests)
    for kind, image in alone.items():
        assert image.std() > 1.0, kind
        assert together[kind].tobytes() == image.tobytes(), kind
