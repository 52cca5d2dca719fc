"""Regional prompts in the engine (this process, ONNX Runtime, tiny checkpoint): each mode against
the torch reference, batch invariance among plain requests, text encoding, and the row limit."""

import numpy as np
import pytest

from serving.client.kserve import request_arrays
from serving.core.regions import RegionLimits, parse_regions
from tests.support.fakes import RecordingSink, drain, make_service

BASE = "a red circle to the left of a blue square"
REGIONS = dict(region_prompts=["a small red circle on the left", "a blue square on the right"], region_divisions="1,1")
MODES = ("latent", "attention")


def run_alone(service, prompt, **fields):
    sink = RecordingSink()
    service.submit(request_arrays(prompt, **fields), sink)
    drain(service)
    assert sink.ends == 1 and sink.error is None, sink.error
    return sink.image


@pytest.mark.parametrize("mode", MODES)
def test_regional_image_matches_the_torch_reference(tiny_repo, tiny_checkpoint, models, mode):
    from training.generate import load_pipeline
    from training.regional_generate import RegionalReference

    pipe = load_pipeline(tiny_checkpoint)
    fields = dict(REGIONS, region_mode=mode, base_prompt_weight=0.3)
    served = [
        run_alone(make_service(tiny_repo, models), BASE, seed=seed, steps=12, guidance_scale=5.0, **fields)
        for seed in (5, 6)
    ]
    regions = parse_regions(request_arrays(BASE, **fields), RegionLimits(vae_factor=4), 32, 32)
    reference = RegionalReference(pipe).images([(BASE, regions, 5), (BASE, regions, 6)], 5.0, 12, mode, size=32)
    for got, want in zip(served, reference):
        difference = np.abs(got.astype(int) - want.astype(int))
        print(
            f"{mode}: served vs torch reference, mean abs difference {difference.mean():.4f}/255 (max {difference.max()})"
        )
        assert difference.mean() <= 2.0
    plain = run_alone(make_service(tiny_repo, models), BASE, seed=5, steps=12, guidance_scale=5.0)
    assert np.abs(plain.astype(int) - served[0].astype(int)).mean() > 2.0  # the regions changed the image


def test_one_region_over_everything_with_no_base_share_is_that_prompt_alone(tiny_repo, models):
    """Latent mode reduces to classifier-free guidance exactly: base weight 0, one region covering
    the canvas gives the bytes of the plain request for the region's prompt."""
    service = make_service(tiny_repo, models)
    fields = dict(seed=9, steps=10, guidance_scale=5.0)
    plain = run_alone(service, "a blue square on the right", **fields)
    regional = run_alone(
        service,
        "a red circle",
        region_prompts=["a blue square on the right"],
        region_divisions="1",
        base_prompt_weight=0.0,
        **fields,
    )
    np.testing.assert_array_equal(regional, plain)


CROWD = [
    ("a blue square", 1, dict(steps=20, guidance_scale=7.5)),
    ("a green triangle at the top", 2, dict(steps=8, guidance_scale=1.0)),
    ("a yellow star", 3, dict(steps=15, guidance_scale=3.0, eta=0.5)),
    ("a small purple circle", 4, dict(steps=12, guidance_scale=5.0)),
    ("two cats", 5, dict(steps=30, guidance_scale=5.0, height=48, width=48)),
    (
        "an orange square",
        6,
        dict(
            steps=14,
            guidance_scale=5.0,
            region_prompts=["a cat", "a dog", "a horse"],
            region_divisions="1,1,1",
            region_mode="attention",
        ),
    ),
    (
        "a white circle",
        7,
        dict(
            steps=18,
            guidance_scale=5.0,
            region_prompts=["a red star"],
            region_divisions="1",
            region_negative_prompts=["blue"],
        ),
    ),
    (
        "a black background",
        8,
        dict(
            steps=12,
            guidance_scale=5.0,
            region_prompts=["a cat", "a dog"],
            region_divisions="1,1",
            region_mode="attention",
        ),
    ),
]


@pytest.mark.parametrize("mode", MODES)
def test_regional_image_is_bit_identical_alone_and_in_a_crowd(tiny_repo, models, mode):
    target = dict(REGIONS, seed=1234, steps=12, guidance_scale=5.0, region_mode=mode)
    alone = run_alone(make_service(tiny_repo, models), BASE, **target)

    service = make_service(tiny_repo, models)
    crowd = [RecordingSink() for _ in CROWD]
    for (prompt, seed, fields), sink in zip(CROWD[:5], crowd):
        service.submit(request_arrays(prompt, seed=seed, **fields), sink)
    for _ in range(3):  # the crowd is mid-flight when the target joins
        service.engine.run_iteration()
    together = RecordingSink()
    service.submit(request_arrays(BASE, **target), together)
    for (prompt, seed, fields), sink in zip(CROWD[5:], crowd[5:]):
        service.submit(request_arrays(prompt, seed=seed, **fields), sink)
    drain(service)
    assert all(s.image is not None and s.ends == 1 for s in crowd), [s.error for s in crowd]
    assert together.ends == 1
    # it shared calls: latent-mode rows with plain rows, attention-mode rows with the other K = 3 job
    assert service.engine.stats.rows > 4 * service.engine.stats.steps
    np.testing.assert_array_equal(together.image, alone)


def test_region_prompts_are_encoded_with_the_batch_and_identical_texts_once(tiny_repo, models):
    service = make_service(tiny_repo, models)
    encoder = service.engine.runner.runners["tiny", "base"].text_encoder
    sinks = [RecordingSink() for _ in range(3)]
    service.submit(request_arrays(BASE, seed=1, steps=2, **REGIONS), sinks[0])
    service.submit(request_arrays(BASE, seed=2, steps=2, region_mode="attention", **REGIONS), sinks[1])
    service.submit(
        request_arrays(
            "a cat", seed=3, steps=2, region_prompts=["a dog", "a blue square on the right"], region_divisions="1;1"
        ),
        sinks[2],
    )
    drain(service)
    assert all(s.image is not None for s in sinks)
    # one call for the admission batch; distinct texts: BASE, 2 regions, "", "a cat", "a dog"
    assert encoder.calls == 1 and encoder.rows == 6
    service.submit(
        request_arrays("a dog", seed=4, steps=2, region_prompts=["a cat"], region_divisions="1"), RecordingSink()
    )
    drain(service)
    assert encoder.calls == 1  # every text was cached


def test_a_job_with_more_rows_than_max_rows_is_refused_by_name(tiny_repo, models):
    service = make_service(tiny_repo, models, max_rows=4)
    refused, fits, attention = RecordingSink(), RecordingSink(), RecordingSink()
    three = dict(region_prompts=["a", "b", "c"], region_divisions="1,1,1", steps=2)
    service.submit(request_arrays("x", **three), refused)  # 3 + 2 rows
    service.submit(request_arrays("x", **REGIONS, steps=2), fits)  # 2 + 2 rows
    service.submit(request_arrays("x", **three, region_mode="attention"), attention)  # 2 rows
    drain(service)
    code, message = refused.error
    assert code == "INVALID_ARG" and message.startswith("region_prompts: ") and "max_rows=4" in message
    assert "need 5 UNet rows" in message
    assert fits.image is not None and attention.image is not None


def test_region_prompt_length_is_checked_by_field(tiny_repo, models):
    service = make_service(tiny_repo, models)
    sink = RecordingSink()
    service.submit(request_arrays("x", region_prompts=["a cat", "red " * 20], region_divisions="1,1"), sink)
    assert sink.error[0] == "INVALID_ARG" and sink.error[1].startswith("region_prompts[1]: is 22 tokens long")
