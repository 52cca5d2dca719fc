"""Steering and prompt schedules in the engine, in this process with the torch runner on CPU
(diffusers' modules; rows come out bit-identical whatever their batch), driven one iteration at
a time. Every exactness claim is a byte comparison.

- a steer before step 0 equals a fresh request with the new values and the same seed;
- a steer at step k equals a reference loop (diffusers' UNet and text encoder, our DDIM step)
  that runs prompt A for k steps and prompt B after, also when guidance crosses 1 (2 -> 1 rows);
- the schedule [A:B:k] equals the live steer at k; [A|B] equals the reference alternating;
- steering one job in a crowd changes no other job's image;
- steer ids are reported at the step that first used them; errors are coded.
"""

import numpy as np
import pytest

from serving.core.errors import FAILED_PRECONDITION, NOT_FOUND
from serving.core.request import InvalidInput
from serving.core.runner import to_uint8
from serving.core.sampler import DDIMSchedule, guided_noise, noise_generator
from serving.core.service import PipelineAssets
from serving.core.steering import GenerationRegistry, SteerRefused
from serving.core.text import PromptTokenizer
from serving.core.variants import VariantSpec
from serving.models.torch_runner import TorchModels
from tests.support.fakes import RecordingSink, drain, make_service, request

A, B = "a red circle on the left", "a blue square at the top"
NEGATIVE = "a green triangle"
STEPS = 10


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return TorchModels(tiny_checkpoint, log=lambda *a: None)


def steer_inputs(prompt=None, negative_prompt=None, guidance_scale=None):
    inputs = {}
    if prompt is not None:
        inputs["prompt"] = np.array([prompt.encode()], object)
    if negative_prompt is not None:
        inputs["negative_prompt"] = np.array([negative_prompt.encode()], object)
    if guidance_scale is not None:
        inputs["guidance_scale"] = np.array([guidance_scale], np.float32)
    return inputs


def run_to_step(service, request_id, step):
    """Iterates until the job has done `step` steps."""
    while service.engine.registry.running[request_id].index < step:
        assert service.engine.run_iteration()


def generate(repo, models, prompt, seed=7, steer_at=None, steer=None, **fields):
    """The image of one request run alone, steered with `steer` (steer_inputs kwargs) after
    `steer_at` steps (0: before admission)."""
    service = make_service(repo, models)
    sink = RecordingSink()
    fields = {"steps": STEPS, "guidance_scale": 5.0, "progress_every": 1, **fields}
    service.submit(request(prompt, seed, **fields), sink, request_id="job")
    if steer_at is not None:
        run_to_step(service, "job", steer_at)
        assert service.steer("job", steer_inputs(**steer)) == 1
    drain(service)
    assert sink.image is not None, sink.error
    return sink


class Reference:
    """One job's denoising loop written out: text encoder and UNet (diffusers' modules, through
    the torch runner's calls), our DDIM step, the VAE; the conditioning of step i from `plan`."""

    def __init__(self, repo, models):
        assets = PipelineAssets.read(repo / "pipeline" / "1")
        self.spec = VariantSpec.table(assets.info)["base"]
        self.tokenizer = PromptTokenizer(assets.tokenizer_dir, self.spec.text_length)
        self.schedule = DDIMSchedule.from_config(self.spec.scheduler_config)
        self.models = models

    def image(self, plan, seed=7, steps=STEPS, size=32) -> np.ndarray:
        """plan(i) -> (prompt, negative prompt, guidance scale) of step i."""
        side = size // self.spec.vae_factor
        latents = noise_generator(seed).standard_normal((self.spec.latent_channels, side, side), dtype=np.float32)
        for i, t in enumerate(self.schedule.timesteps(steps)):
            prompt, negative, guidance = plan(i)
            texts = [prompt, negative] if guidance > 1.0 else [prompt]
            context = self.models.encode_text(input_ids=self.tokenizer.encode(texts))["last_hidden_state"]
            rows = self.models.unet(
                np.repeat(latents[None], len(texts), axis=0),
                timestep=np.full(len(texts), t, np.float32),
                encoder_hidden_states=context,
            )
            eps = guided_noise(rows[1:2], rows[0:1], np.array([guidance]))[0] if guidance > 1.0 else rows[0]
            t_row = np.array([t])
            prev, _ = self.schedule.step(
                eps[None],
                t_row,
                self.schedule.previous_timesteps(t_row, np.array([steps])),
                latents[None],
                np.array([0.0]),
            )
            latents = prev[0]
        return to_uint8(self.models.decode(latents[None])[0])


@pytest.fixture(scope="module")
def reference(tiny_repo, models):
    return Reference(tiny_repo, models)


def test_plain_request_equals_the_reference_loop(tiny_repo, models, reference):
    """The reference is exact for unsteered requests, so the comparisons below are meaningful."""
    served = generate(tiny_repo, models, A, negative_prompt=NEGATIVE)
    assert served.image.tobytes() == reference.image(lambda i: (A, NEGATIVE, 5.0)).tobytes()


@pytest.mark.parametrize(
    "steer",
    [dict(prompt=B), dict(prompt=B, negative_prompt="", guidance_scale=8.0), dict(guidance_scale=1.0)],
    ids=["prompt", "all-fields", "guidance-off"],
)
def test_steer_before_step_0_equals_a_fresh_request(tiny_repo, models, steer):
    steered = generate(tiny_repo, models, A, negative_prompt=NEGATIVE, steer_at=0, steer=steer)
    fresh = {"prompt": A, "negative_prompt": NEGATIVE, "guidance_scale": 5.0, **steer}
    expected = generate(tiny_repo, models, fresh.pop("prompt"), **fresh)
    assert steered.image.tobytes() == expected.image.tobytes()
    assert steered.steered == [(1, (1,))]  # step 0 (reported after it: step count 1) used steer 1


@pytest.mark.parametrize("k", [1, 4, STEPS - 1])
def test_steer_at_step_k_equals_a_for_k_steps_then_b(tiny_repo, models, reference, k):
    steered = generate(tiny_repo, models, A, negative_prompt=NEGATIVE, steer_at=k, steer=dict(prompt=B))
    expected = reference.image(lambda i: (A if i < k else B, NEGATIVE, 5.0))
    assert steered.image.tobytes() == expected.tobytes()
    assert steered.steered == [(k + 1, (1,))]
    assert steered.image.tobytes() != reference.image(lambda i: (A, NEGATIVE, 5.0)).tobytes()


def test_steer_that_turns_guidance_off_changes_the_rows_from_that_step(tiny_repo, models, reference):
    service = make_service(tiny_repo, models)
    sink = RecordingSink()
    service.submit(
        request(A, 7, steps=STEPS, guidance_scale=5.0, negative_prompt=NEGATIVE, progress_every=1),
        sink,
        request_id="job",
    )
    run_to_step(service, "job", 3)
    assert service.engine.stats.last_rows == 2
    service.steer("job", steer_inputs(prompt=B, guidance_scale=1.0))
    service.engine.run_iteration()
    assert service.engine.stats.last_rows == 1
    drain(service)
    expected = reference.image(lambda i: (A, NEGATIVE, 5.0) if i < 3 else (B, NEGATIVE, 1.0))
    assert sink.image.tobytes() == expected.tobytes()


def test_schedule_equals_the_live_steer_and_alternation_the_reference(tiny_repo, models, reference):
    k = 4
    live = generate(tiny_repo, models, A, steer_at=k, steer=dict(prompt=B))
    scheduled = generate(tiny_repo, models, f"[{A}:{B}:{k}]")
    fraction = generate(tiny_repo, models, f"[{A}:{B}:0.4]")  # floor(0.4 x 10) = 4
    assert scheduled.image.tobytes() == live.image.tobytes() == fraction.image.tobytes()
    assert scheduled.steered == []  # a schedule is no steer
    alternating = generate(tiny_repo, models, "a [red|blue] circle", negative_prompt="[green|] square")
    expected = reference.image(
        lambda i: (("a red circle", "green square") if i % 2 == 0 else ("a blue circle", " square")) + (5.0,)
    )
    assert alternating.image.tobytes() == expected.tobytes()


def test_alternation_encodes_each_distinct_text_once(tiny_repo, models):
    service = make_service(tiny_repo, models)
    encoder = service.engine.runner.runners["tiny", "base"].text_encoder
    sink = RecordingSink()
    service.submit(request("[red|blue] circle", 3, steps=20), sink)
    drain(service)
    assert sink.image is not None and encoder.calls == 1 and encoder.rows == 3  # 2 prompts, 1 negative


def test_steering_one_job_in_a_crowd_changes_no_other_image(tiny_repo, models):
    crowd = [
        ("a blue square", 1, dict(steps=12, guidance_scale=7.5)),
        ("a green triangle at the top", 2, dict(steps=8, guidance_scale=1.0)),
        ("a yellow star", 3, dict(steps=15, guidance_scale=3.0, eta=0.5)),
        ("two cats", 5, dict(steps=10, guidance_scale=5.0, height=48, width=48)),
        ("a white circle", 7, dict(steps=9, guidance_scale=2.0)),
    ]

    def run(steer):
        service = make_service(tiny_repo, models)
        sinks = [RecordingSink() for _ in crowd]
        for i, ((prompt, seed, fields), sink) in enumerate(zip(crowd, sinks)):
            service.submit(request(prompt, seed, progress_every=1, **fields), sink, request_id=f"job-{i}")
        for _ in range(4):
            service.engine.run_iteration()
        if steer is not None:
            service.steer("job-2", steer_inputs(**steer))
        drain(service)
        assert all(s.image is not None for s in sinks)
        return [s.image.tobytes() for s in sinks]

    unsteered = run(None)
    for steer in (dict(prompt="a red circle"), dict(guidance_scale=1.0)):  # same rows, and one row fewer
        steered = run(steer)
        assert steered[2] != unsteered[2]
        assert steered[:2] + steered[3:] == unsteered[:2] + unsteered[3:]


def test_steers_between_iterations_apply_together_and_build_on_each_other(tiny_repo, models, reference):
    service = make_service(tiny_repo, models)
    sink = RecordingSink()
    service.submit(request(A, 7, steps=STEPS, guidance_scale=5.0, progress_every=5), sink, request_id="job")
    run_to_step(service, "job", 2)
    assert service.steer("job", steer_inputs(prompt=B)) == 1
    assert service.steer("job", steer_inputs(negative_prompt=NEGATIVE)) == 2
    drain(service)
    assert sink.steered == [(3, (1, 2))]  # reported although progress_every skips step 3
    assert [s for s, _ in sink.progress_log] == [3, 5]
    expected = reference.image(lambda i: (A, "", 5.0) if i < 2 else (B, NEGATIVE, 5.0))
    assert sink.image.tobytes() == expected.tobytes()


def test_steer_of_a_queued_job_applies_from_step_0(tiny_repo, models):
    service = make_service(tiny_repo, models, max_active=1)
    first, queued = RecordingSink(), RecordingSink()
    service.submit(request(A, 1, steps=3), first, request_id="first")
    service.submit(request(A, 7, steps=STEPS, progress_every=1), queued, request_id="queued")
    service.engine.run_iteration()
    assert len(service.engine.scheduler.waiting) == 1
    service.steer("queued", steer_inputs(prompt=B))
    drain(service)
    assert queued.steered == [(1, (1,))]
    assert queued.image.tobytes() == generate(tiny_repo, models, B).image.tobytes()


def test_steer_on_the_last_step_is_reported_before_the_image(tiny_repo, models):
    sink = generate(tiny_repo, models, A, steer_at=STEPS - 1, steer=dict(prompt=B), progress_every=0)
    assert sink.steered == [(STEPS, (1,))] and sink.events[-1] == "image"


def test_unknown_finished_and_invalid_steers_are_refused_with_codes(tiny_repo, models):
    service = make_service(tiny_repo, models)
    with pytest.raises(SteerRefused) as info:
        service.steer("nobody", steer_inputs(prompt=B))
    assert info.value.code == NOT_FOUND and "no generation with id 'nobody'" in str(info.value)
    sink = RecordingSink()
    service.submit(request(A, 1, steps=4, progress_every=1), sink, request_id="job")
    service.engine.run_iteration()
    refused = [
        (steer_inputs(), "steer", "needs at least one of prompt, negative_prompt, guidance_scale"),
        ({**steer_inputs(prompt=B), "seed": np.array([3])}, "seed", "cannot be steered"),
        (steer_inputs(guidance_scale=99.0), "guidance_scale", "must be a finite number in [0.0, 50.0]"),
        (steer_inputs(prompt="  "), "prompt", "must not be empty"),
        (steer_inputs(prompt="[a:b"), "prompt", "prompt schedule syntax: '[' is never closed at position 0"),
        (steer_inputs(negative_prompt="red " * 40), "negative_prompt", "tokens long"),
    ]
    for inputs, field, message in refused:
        with pytest.raises(InvalidInput) as bad:
            service.steer("job", inputs)
        assert bad.value.field == field and message in str(bad.value), str(bad.value)
    assert service.engine.active[0].steers == 0 and service.engine.active[0].request.prompt == A
    drain(service)
    assert sink.image is not None and sink.ends == 1
    with pytest.raises(SteerRefused) as info:
        service.steer("job", steer_inputs(prompt=B))
    assert info.value.code == FAILED_PRECONDITION and "generation 'job' has finished" in str(info.value)


def test_malformed_schedule_in_a_request_is_invalid_arg(tiny_repo, models):
    service = make_service(tiny_repo, models)
    sink = RecordingSink()
    service.submit(request("a [red:blue:x] circle", 1, steps=4), sink)
    assert sink.error == (
        "INVALID_ARG",
        "prompt: prompt schedule syntax: 'when' must be a non-negative number, got 'x' at position 12",
    )


def test_registry_remembers_a_bounded_number_of_ended_ids():
    class Job:
        done = False
        timesteps = None

        def __init__(self, request_id):
            self.request_id = request_id

    registry = GenerationRegistry(remember=3)
    jobs = [Job(f"g{i}") for i in range(5)]
    for job in jobs:
        registry.add(job)
        registry.end(job)
    assert list(registry.ended) == ["g2", "g3", "g4"] and registry.running == {}
    for request_id, code in (("g4", FAILED_PRECONDITION), ("g0", NOT_FOUND)):
        with pytest.raises(SteerRefused) as info:
            registry.find(request_id)
        assert info.value.code == code


def test_failed_encoding_of_a_steer_ends_that_job_with_unavailable_only(tiny_repo, models):
    service = make_service(tiny_repo, models)
    steered, other = RecordingSink(), RecordingSink()
    service.submit(request(A, 1, steps=6), steered, request_id="steered")
    service.submit(request(B, 2, steps=6), other, request_id="other")
    service.engine.run_iteration()
    encoder = service.engine.runner.runners["tiny", "base"].text_encoder
    working = encoder.encode_text

    def broken(**ids):
        encoder.encode_text = working  # once
        raise RuntimeError("text encoder down (injected)")

    encoder.encode_text = broken
    service.steer("steered", steer_inputs(prompt="a yellow star"))
    drain(service)
    assert (
        steered.ends == 1 and steered.error[0] == "INTERNAL" and "text encoding of a steer failed" in steered.error[1]
    )
    assert other.image is not None and other.ends == 1
    with pytest.raises(SteerRefused) as info:
        service.steer("steered", steer_inputs(prompt=B))
    assert info.value.code == FAILED_PRECONDITION


def test_a_second_request_with_a_running_id_is_refused_and_takes_over_nothing(tiny_repo, models):
    """Request ids come from clients: a duplicate must not replace the first in the registry
    (its steers and cancels would reach the wrong job)."""
    service = make_service(tiny_repo, models)
    first, second = RecordingSink(), RecordingSink()
    service.submit(request(A, 1, steps=4), first, request_id="dup")
    service.submit(request(A, 2, steps=4), second, request_id="dup")
    assert second.error[0] == "INVALID_ARG" and second.error[1].startswith("request_id: 'dup' names a generation")
    assert service.engine.registry.running["dup"].sink is first
    assert service.steer("dup", steer_inputs(prompt=B)) == 1
    drain(service)
    assert first.image is not None and first.ends == 1 and second.ends == 1
