"""Regions and image conditioning in one request: a regional inpainting (latent blending on the
base UNet, or the 9-channel inpainting UNet) and a regional img2img run like any other job: the
kept half is the input's, and the image is bit-identical alone and inside a mixed crowd."""

import numpy as np
import pytest

from tests.support.image_inputs import drain, half_mask, photo, service, submit

PROMPT = "a grey background"
IMAGE = photo(32, 1)
REGIONS = dict(region_prompts=["a small red circle", "a blue square"], region_divisions="1,1")
REQUESTS = {
    "regional inpaint": dict(init_image=IMAGE, mask=half_mask(32), seed=3, steps=10, guidance_scale=5.0, **REGIONS),
    "regional img2img": dict(init_image=IMAGE, strength=0.7, seed=4, steps=10, guidance_scale=5.0, **REGIONS),
}
CROWD = [
    dict(seed=11, steps=12),
    dict(init_image=photo(32, 5), mask=half_mask(32, "left"), seed=12, steps=9),
    dict(seed=13, steps=8, **REGIONS),
]


@pytest.mark.parametrize("repo_fixture", ["tiny_repo", "variant_repo"])
def test_regions_combine_with_an_inpainting_mask_and_an_init_image(request, repo_fixture):
    svc = service(request.getfixturevalue(repo_fixture))
    alone = {}
    for name, fields in REQUESTS.items():
        sink = submit(svc, PROMPT, **fields)
        drain(svc)
        assert sink.error is None and sink.ends == 1, sink.error
        alone[name] = sink.image
    kept = alone["regional inpaint"][:, :16].astype(int)  # the mask repaints the right half
    assert np.abs(kept - IMAGE[:, :16]).max() == 0
    crowd = [submit(svc, PROMPT, **f) for f in CROWD]
    svc.engine.run_iteration()
    together = {name: submit(svc, PROMPT, **fields) for name, fields in REQUESTS.items()}
    drain(svc)
    assert all(s.ends == 1 and s.error is None for s in crowd + list(together.values()))
    for name, sink in together.items():
        assert sink.image.tobytes() == alone[name].tobytes(), name
