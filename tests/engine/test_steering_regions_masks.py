"""Steering a running generation's regions and inpainting mask, in this process. Every exactness
claim is a byte comparison.

- regions (latent mode, torch runner): a steer at step k equals a reference loop that runs
  prompt A's plain rows for k steps, then the regions' rows combined by the latent-couple rule
  written out; a steer before step 0 equals a fresh request with those regions, in both modes
  (ONNX Runtime for attention mode, whose regional UNet only it runs), also when the number of
  regions (the regional UNet's contexts, the latent mode's rows) changes;
- mask (latent-blend inpainting, torch runner): a steer at step k equals a reference loop that
  blends with mask A for k steps and mask B after, and the paste-back follows B; before step 0
  (also on the 9-channel inpainting UNet, which encodes the new masked image once) it equals a
  fresh request with the new mask; in a crowd it changes no other image;
- bad steers are refused naming the field, and the job runs on unchanged.
"""

import numpy as np
import pytest

from tests.support.image_inputs import half_mask, photo
from tests.support.image_inputs import service as onnx_service
from serving.client.kserve import request_arrays
from serving.core.request import InvalidInput
from serving.core.regions import RegionLimits, parse_regions
from serving.core.runner import to_uint8
from serving.core.sampler import guided_noise, image_noise_generator, noise_generator
from tests.support.fakes import RecordingSink, drain
from tests.support.fakes import make_service
from test_steering_engine import A, STEPS, Reference, models, run_to_step  # noqa: F401 (models: a fixture)

REGIONS = dict(region_prompts=["a small red circle", "a blue square"], region_divisions="1,1", base_prompt_weight=0.3)
THREE = dict(region_prompts=["a cat", "a green triangle", "a dog"], region_divisions="1,1,1")
IMAGE = photo(32, 1)


def steer_arrays(**fields):
    """A steer's named arrays, typed as a request's (request_arrays without the prompt it adds)."""
    arrays = request_arrays(fields.pop("prompt", ""), **fields)
    if not arrays["prompt"][0]:
        del arrays["prompt"]
    return arrays


def run(svc, prompt, steer_at=None, steer=None, **fields):
    """One request alone, steered with `steer` (request fields) once it has done `steer_at` steps."""
    sink = RecordingSink()
    svc.submit(
        request_arrays(prompt, **{"seed": 7, "steps": STEPS, "guidance_scale": 5.0, "progress_every": 1, **fields}),
        sink,
        request_id="job",
    )
    if steer_at is not None:
        run_to_step(svc, "job", steer_at)
        assert svc.steer("job", steer_arrays(**steer)) == 1
    drain(svc)
    assert sink.image is not None and sink.ends == 1, sink.error
    return sink


class SteeredReference(Reference):
    """Reference's loop with a per-step rule: plain guidance, or regions in latent mode, or
    latent-blend inpainting, written out from their definitions."""

    def regional_image(self, plan, seed=7, steps=STEPS, size=32, inpaint=None) -> np.ndarray:
        """plan(i) -> (prompt, regions or None, mask or None) of step i (negative "", g 5);
        inpaint: the init image, for latent blending with plan's masks."""
        guidance = 5.0
        side = size // self.spec.vae_factor
        noise = noise_generator(seed).standard_normal((self.spec.latent_channels, side, side), dtype=np.float32)
        latents = noise
        if inpaint is not None:
            mean, std = self.models.encode_image(inpaint[None].astype(np.float32) / 255)
            init = mean[0] + std[0] * image_noise_generator(seed).standard_normal(mean[0].shape, dtype=np.float32)
        timesteps = self.schedule.timesteps(steps)
        for i, t in enumerate(timesteps):
            prompt, regions, mask = plan(i)
            texts = [prompt, *(regions.prompts if regions else ()), ""]
            context = self.models.encode_text(self.tokenizer.encode(texts))["last_hidden_state"]
            rows = self.models.unet(np.repeat(latents[None], len(texts), axis=0), np.full(len(texts), t), context)
            uncond, conds = rows[-1:], rows[:-1]
            if regions is None:
                eps = guided_noise(uncond, conds, np.array([guidance]))[0]
            else:  # latent couple: every context guided against the negative, mixed by its cell weights
                guided = uncond + np.float32(guidance) * (conds - uncond)
                eps = (regions.weights[:, None] * guided).sum(axis=0)
            t_row = np.array([t])
            prev, _ = self.schedule.step(
                eps[None],
                t_row,
                self.schedule.previous_timesteps(t_row, np.array([steps])),
                latents[None],
                np.array([0.0]),
            )
            latents = prev[0]
            if mask is not None:  # keep the init latents, noised to the next timestep, outside the mask
                kept = self.schedule.add_noise(init, noise, timesteps[i + 1]) if i + 1 < steps else init
                cells = (mask[:: self.spec.vae_factor, :: self.spec.vae_factor] >= 128)[None].astype(np.float32)
                latents = ((1 - cells) * kept + cells * latents).astype(np.float32)
        image = to_uint8(self.models.decode(latents[None])[0])
        if inpaint is None:
            return image
        weight = (plan(steps - 1)[2] >= 128)[..., None].astype(np.float32)  # the last mask, not blurred (mask_blur 0)
        return np.round(weight * image + (1 - weight) * inpaint.astype(np.float32)).astype(np.uint8)


@pytest.fixture(scope="module")
def reference(tiny_repo, models):
    return SteeredReference(tiny_repo, models)


def regions_of(fields, size=32):
    return parse_regions(request_arrays(A, **fields), RegionLimits(vae_factor=4), size, size)


@pytest.mark.parametrize("k", [0, 3, STEPS - 1])
def test_regions_steered_at_step_k_equal_plain_rows_then_the_latent_couple(tiny_repo, models, reference, k):
    svc = make_service(tiny_repo, models)
    steered = run(svc, A, steer_at=k, steer=REGIONS)
    regions = regions_of(REGIONS)
    expected = reference.regional_image(lambda i: (A, None if i < k else regions, None))
    assert steered.image.tobytes() == expected.tobytes()
    assert steered.steered == [(k + 1, (1,))]
    assert steered.image.tobytes() != reference.regional_image(lambda i: (A, None, None)).tobytes()


def test_steer_changes_the_latent_rows_from_the_step_it_applies(tiny_repo, models):
    svc = make_service(tiny_repo, models)
    sink = RecordingSink()
    svc.submit(request_arrays(A, steps=STEPS, guidance_scale=5.0, seed=7, **REGIONS), sink, request_id="job")
    run_to_step(svc, "job", 2)
    assert svc.engine.stats.last_rows == 4  # base + 2 regions + negative
    svc.steer("job", steer_arrays(**THREE))  # a steer's regions replace the job's: 3 of them
    svc.engine.run_iteration()
    assert svc.engine.stats.last_rows == 5
    drain(svc)
    assert sink.image is not None and sink.ends == 1


@pytest.mark.parametrize("mode", ["latent", "attention"])
def test_regions_steered_before_step_0_equal_a_fresh_request(tiny_repo, mode):
    start = dict(REGIONS, region_mode=mode)
    steered = run(onnx_service(tiny_repo), A, steer_at=0, steer=THREE, **start)  # mode kept, 2 -> 3 regions
    fresh = run(onnx_service(tiny_repo), A, **THREE, region_mode=mode)
    assert steered.image.tobytes() == fresh.image.tobytes()
    # and from plain text to regions, switching to the regional UNet in attention mode
    steered = run(onnx_service(tiny_repo), A, steer_at=0, steer=dict(REGIONS, region_mode=mode))
    assert steered.image.tobytes() == run(onnx_service(tiny_repo), A, **REGIONS, region_mode=mode).image.tobytes()


def test_attention_regions_steered_mid_run_switch_network_and_finish(tiny_repo):
    svc = onnx_service(tiny_repo)
    unsteered = run(svc, A, **REGIONS, region_mode="attention").image
    steered = run(svc, A, steer_at=4, steer=THREE, **REGIONS, region_mode="attention")
    assert steered.steered == [(5, (1,))] and steered.image.tobytes() != unsteered.tobytes()


def test_mask_steered_at_step_k_equals_mask_a_then_mask_b(tiny_repo, models, reference):
    svc = make_service(tiny_repo, models)
    first, second = half_mask(32, "right"), half_mask(32, "left")
    k = 4
    steered = run(svc, A, steer_at=k, steer=dict(mask=second), init_image=IMAGE, mask=first)
    expected = reference.regional_image(lambda i: (A, None, first if i < k else second), inpaint=IMAGE)
    assert steered.image.tobytes() == expected.tobytes()
    assert steered.steered == [(k + 1, (1,))]
    # the paste-back follows the new mask: the right half (kept by mask B) is the input's
    np.testing.assert_array_equal(steered.image[:, 16:], IMAGE[:, 16:])
    assert not np.array_equal(steered.image[:, :16], IMAGE[:, :16])


@pytest.mark.parametrize("repo_fixture", ["tiny_repo", "variant_repo"])
def test_mask_steered_before_step_0_equals_a_fresh_request(request, repo_fixture):
    repo = request.getfixturevalue(repo_fixture)
    fields = dict(init_image=IMAGE, strength=0.8, mask_blur=1)
    svc = onnx_service(repo)
    encodes = []
    runner = svc.engine.runner.runners["tiny", "inpaint" if repo_fixture == "variant_repo" else "base"]
    encode = runner.models.encode_image
    runner.models.encode_image = lambda images: encodes.append(len(images)) or encode(images)
    steered = run(svc, A, steer_at=1, steer=dict(mask=half_mask(32, "left")), mask=half_mask(32, "right"), **fields)
    # latent blending reuses the init latents; the 9-channel UNet's masked image is encoded again
    assert encodes == ([2, 2] if repo_fixture == "variant_repo" else [1])
    at_0 = run(
        onnx_service(repo), A, steer_at=0, steer=dict(mask=half_mask(32, "left")), mask=half_mask(32, "right"), **fields
    )
    fresh = run(onnx_service(repo), A, mask=half_mask(32, "left"), **fields)
    assert at_0.image.tobytes() == fresh.image.tobytes()
    assert steered.image.tobytes() != fresh.image.tobytes()


def test_steering_one_mask_in_a_crowd_changes_no_other_image(variant_repo):
    crowd = [
        dict(seed=1, steps=12),
        dict(init_image=IMAGE, mask=half_mask(32), seed=2, steps=12),
        dict(init_image=photo(32, 3), strength=0.6, seed=3, steps=12),
        dict(seed=4, steps=9, **REGIONS),
    ]

    def images(steer):
        svc = onnx_service(variant_repo)
        sinks = [RecordingSink() for _ in crowd]
        for i, (fields, sink) in enumerate(zip(crowd, sinks)):
            svc.submit(request_arrays(A, guidance_scale=5.0, **fields), sink, request_id=f"job-{i}")
        for _ in range(3):
            svc.engine.run_iteration()
        if steer:
            svc.steer("job-1", steer_arrays(mask=half_mask(32, "left")))
        drain(svc)
        assert all(s.image is not None and s.ends == 1 for s in sinks)
        return [s.image.tobytes() for s in sinks]

    unsteered, steered = images(False), images(True)
    assert steered[1] != unsteered[1]
    assert steered[:1] + steered[2:] == unsteered[:1] + unsteered[2:]


def test_bad_region_and_mask_steers_are_refused_naming_the_field(tiny_repo):
    svc = onnx_service(tiny_repo, max_rows=6)
    sink = RecordingSink()
    svc.submit(request_arrays(A, steps=6, seed=1), sink, request_id="job")
    svc.engine.run_iteration()
    refused = [
        (dict(base_prompt_weight=0.5), "base_prompt_weight", "needs region_prompts"),
        (dict(region_prompts=["a cat"]), "region_divisions", "need region_divisions or region_masks"),
        (
            dict(region_prompts=["a cat", "a dog"], region_masks=np.full((2, 16, 16), 255, np.uint8)),
            "region_masks",
            "must have shape [2, 32, 32]",
        ),
        (dict(region_prompts=["a cat", "a dog"], region_divisions="1,1,1"), "region_divisions", "makes 3 regions"),
        (dict(region_prompts=["a", "b", "c", "d", "e"], region_divisions="1,1,1,1,1"), "region_prompts", "max_rows=6"),
        (dict(mask=half_mask(32)), "mask", "inpainting generation only; this one is txt2img"),
    ]
    for fields, field, message in refused:
        with pytest.raises(InvalidInput) as bad:
            svc.steer("job", steer_arrays(**fields))
        assert bad.value.field == field and message in str(bad.value), str(bad.value)
    inpainting = RecordingSink()
    svc.submit(
        request_arrays(A, steps=6, seed=2, init_image=IMAGE, mask=half_mask(32)), inpainting, request_id="inpaint"
    )
    svc.engine.run_iteration()
    with pytest.raises(InvalidInput) as bad:
        svc.steer("inpaint", steer_arrays(mask=half_mask(16)))
    assert bad.value.field == "mask" and "init_image's size [32, 32]" in str(bad.value)
    assert svc.engine.registry.running["job"].steers == 0
    drain(svc)
    assert sink.image is not None and inpainting.image is not None
