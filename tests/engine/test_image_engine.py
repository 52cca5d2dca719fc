"""Image-conditioned jobs in the engine, in this process (ONNX Runtime): every kind is the same
alone and inside a crowd of mixed kinds (bit for bit), input images are VAE-encoded in one call
per admission, and jobs of different UNet variants never share a call but all progress."""

from dataclasses import replace

import pytest

from tests.support.image_inputs import drain, half_mask, photo, service, submit

PROMPT = "a large red circle on the left"
IMAGE, LOW_RES = photo(32, 1), photo(8, 2)
KINDS = {  # one request of every kind (the inpainting one goes to the 9-channel UNet when there is one)
    "txt2img": dict(seed=1, steps=12, guidance_scale=5.0),
    "img2img": dict(init_image=IMAGE, strength=0.6, seed=2, steps=14, guidance_scale=5.0),
    "inpaint": dict(init_image=IMAGE, mask=half_mask(32), mask_blur=2, seed=3, steps=12, guidance_scale=7.5),
    "upscale": dict(task="upscale", init_image=LOW_RES, noise_level=40, seed=4, steps=12, guidance_scale=5.0),
}
CROWD = [  # mixed kinds, sizes, steps, guidance and eta
    dict(seed=11, steps=20, guidance_scale=7.5),
    dict(seed=12, steps=16, guidance_scale=1.0, height=48, width=48),
    dict(init_image=photo(48, 3), strength=0.9, seed=13, steps=18, guidance_scale=3.0, eta=0.5),
    dict(init_image=IMAGE, mask=half_mask(32, "left"), seed=14, steps=15, guidance_scale=5.0, eta=1.0),
    dict(task="upscale", init_image=photo(8, 4), seed=15, steps=17, guidance_scale=1.0),
    dict(init_image=photo(32, 5), strength=0.5, seed=16, steps=22, guidance_scale=5.0),
    dict(task="upscale", init_image=photo(12, 6), noise_level=100, seed=17, steps=13, guidance_scale=4.0),
    dict(init_image=photo(48, 7), mask=half_mask(48), seed=18, steps=19, guidance_scale=2.0, keep_unmasked=False),
]


def crowd_for(svc):
    upscale = "upscale" in svc.limits.variants
    return [f for f in CROWD if upscale or f.get("task") != "upscale"]


@pytest.mark.parametrize("repo_fixture", ["tiny_repo", "variant_repo"])
def test_every_kind_is_bit_identical_alone_and_in_a_mixed_crowd(request, repo_fixture):
    svc = service(request.getfixturevalue(repo_fixture))
    kinds = {k: f for k, f in KINDS.items() if k != "upscale" or "upscale" in svc.limits.variants}
    alone = {}
    for kind, fields in kinds.items():
        sink = submit(svc, PROMPT, **fields)
        drain(svc)
        alone[kind] = sink.image
    crowd = crowd_for(svc)
    before = (svc.engine.stats.rows, svc.engine.stats.steps)
    crowd_sinks = [submit(svc, PROMPT, **f) for f in crowd[: len(crowd) // 2]]
    for _ in range(3):  # the crowd is mid-flight when the targets join
        svc.engine.run_iteration()
    together = {kind: submit(svc, PROMPT, **fields) for kind, fields in kinds.items()}
    crowd_sinks += [submit(svc, PROMPT, **f) for f in crowd[len(crowd) // 2 :]]
    drain(svc)
    assert all(s.image is not None and s.ends == 1 for s in crowd_sinks + list(together.values()))
    rows, steps = svc.engine.stats.rows - before[0], svc.engine.stats.steps - before[1]
    print(f"{repo_fixture}: {rows / steps:.1f} UNet rows per call in the crowd")
    assert rows > 2.5 * steps  # calls really were shared (alone: 2 rows, or 1 without guidance)
    for kind, sink in together.items():
        assert sink.image.tobytes() == alone[kind].tobytes(), kind


class Recording:
    """Wraps a variant's models: records VAE-encoder calls and the variants of UNet calls."""

    def __init__(self, models, variant, log):
        self.models, self.variant, self.log = models, variant, log

    def __getattr__(self, name):
        return getattr(self.models, name)

    def encode_image(self, images):
        self.log.append(("encode", images.shape))
        return self.models.encode_image(images)

    def unet(self, sample, timestep, encoder_hidden_states, **extra):
        self.log.append(("unet", self.variant, sample.shape[1]))
        return self.models.unet(sample, timestep, encoder_hidden_states, **extra)


def recording_service(repo, log):
    svc = service(repo)
    for (_, variant), runner in svc.engine.runner.runners.items():
        runner.models = Recording(runner.models, variant, log)
    return svc


def test_images_admitted_together_are_encoded_in_one_call_per_size(tiny_repo):
    log = []
    svc = recording_service(tiny_repo, log)
    for seed in range(3):
        submit(svc, PROMPT, init_image=photo(32, seed), seed=seed, steps=4)
    submit(svc, PROMPT, init_image=photo(48, 9), mask=half_mask(48), seed=9, steps=4)
    svc.engine.run_iteration()
    assert [e for e in log if e[0] == "encode"] == [("encode", (3, 32, 32, 3)), ("encode", (1, 48, 48, 3))]
    drain(svc)


def test_encoder_calls_stay_within_its_max_batch(tiny_repo):
    log = []
    svc = recording_service(tiny_repo, log)
    runner = svc.engine.runner.runners["tiny", "base"]
    runner.variant = replace(runner.variant, max_batch={**runner.variant.max_batch, "vae_encoder": 2})
    for seed in range(5):
        submit(svc, PROMPT, init_image=photo(32, seed), seed=seed, steps=4)
    drain(svc)
    assert [e[1][0] for e in log if e[0] == "encode"] == [2, 2, 1]


def test_variants_never_share_a_call_and_each_gets_its_turn(variant_repo):
    log = []
    svc = recording_service(variant_repo, log)
    for fields in (KINDS["txt2img"], KINDS["inpaint"], KINDS["upscale"], KINDS["img2img"]):
        submit(
            svc, PROMPT, **{**fields, "steps": 30, "strength": 1.0} if "strength" in fields else {**fields, "steps": 30}
        )
    for _ in range(9):
        svc.engine.run_iteration()
    calls = [e for e in log if e[0] == "unet"]
    # the UNet's input channels: 4 (base), 4 + 1 + 4 (inpainting), 4 + 3 (upscaler)
    assert {(v, c) for _, v, c in calls} == {("base", 4), ("inpaint", 9), ("upscale", 7)}
    assert [v for _, v, _ in calls[:9]].count("base") == 3  # round robin over the three call keys
    drain(svc)
