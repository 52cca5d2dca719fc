"""Image-conditioned generation through a real tritonserver (the VAE encoder over BLS): the same
bytes as in process, alone and inside a crowd of mixed kinds; bad combinations answer
INVALID_ARG naming the field over gRPC and HTTP, and the server keeps serving."""

from concurrent.futures import ThreadPoolExecutor
import subprocess
import sys
import threading

import numpy as np
from PIL import Image
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support.image_inputs import generate, half_mask, photo, service
from tests.support.server_metrics import idle_metrics, metrics, wait_for
from serving.client.kserve import LdmClient

PROMPT = "a large red circle on the left"
IMAGE, LOW_RES = photo(32, 1), photo(8, 2)
KINDS = {
    "txt2img": dict(seed=1, steps=10, guidance_scale=5.0),
    "img2img": dict(init_image=IMAGE, strength=0.6, seed=2, steps=12, guidance_scale=5.0),
    "inpaint": dict(init_image=IMAGE, mask=half_mask(32), mask_blur=2, seed=3, steps=10, guidance_scale=7.5),
    "upscale": dict(task="upscale", init_image=LOW_RES, noise_level=40, seed=4, steps=10, guidance_scale=5.0),
}
CROWD = [  # long enough (tiny steps take milliseconds) to overlap the targets on any machine
    dict(seed=11, steps=100, guidance_scale=7.5),
    dict(init_image=photo(32, 3), strength=1.0, seed=13, steps=95, guidance_scale=3.0, eta=0.5),
    dict(init_image=IMAGE, mask=half_mask(32, "left"), seed=14, steps=105, guidance_scale=5.0),
    dict(task="upscale", init_image=photo(8, 4), seed=15, steps=100, guidance_scale=1.0),
    dict(seed=16, steps=98, guidance_scale=1.0, height=48, width=48),
    dict(init_image=photo(48, 5), mask=half_mask(48), seed=17, steps=96, guidance_scale=2.0, eta=1.0),
]


@pytest.mark.parametrize("which", ["server", "variant_server"])
def test_every_kind_served_alone_and_in_a_mixed_crowd_is_bit_identical_to_in_process(request, which):
    server = request.getfixturevalue(which)
    variants = which == "variant_server"
    kinds = {k: f for k, f in KINDS.items() if variants or k != "upscale"}
    crowd = [f for f in CROWD if variants or f.get("task") != "upscale"]
    local = service(server.repo)
    with LdmClient(server.grpc_url) as client:
        alone = {kind: client.generate(PROMPT, **fields) for kind, fields in kinds.items()}

    started = [threading.Event() for _ in crowd]

    def one(fields, started=None):
        with LdmClient(server.grpc_url) as client:
            if started is None:
                return client.generate(PROMPT, **fields)
            return client.run(PROMPT, progress_every=1, on_progress=lambda _: started.set(), **fields).image

    before = idle_metrics(server)
    with ThreadPoolExecutor(len(crowd) + len(kinds)) as pool:
        futures = [pool.submit(one, fields, event) for fields, event in zip(crowd, started)]
        assert all(event.wait(120) for event in started)  # the crowd is mid-flight when the targets arrive
        together = {kind: pool.submit(one, fields) for kind, fields in kinds.items()}
        together = {kind: f.result() for kind, f in together.items()}
        assert all(f.result().dtype == np.uint8 for f in futures)
    assert wait_for(
        lambda: (
            metrics(server)["ldm_images_completed_total"]
            >= before["ldm_images_completed_total"] + len(futures) + len(kinds)
        )
    )
    after = metrics(server)
    rows, steps = (after[k] - before[k] for k in ("ldm_unet_rows_total", "ldm_unet_steps_total"))
    assert rows > 2 * steps, rows / steps  # requests really shared UNet calls
    for kind, fields in kinds.items():
        assert together[kind].tobytes() == alone[kind].tobytes(), kind
        # BLS VAE encoder in Triton == ONNX Runtime in this process (itself checked against diffusers)
        assert alone[kind].tobytes() == generate(local, PROMPT, **fields).tobytes(), kind


BAD = [
    (dict(mask=half_mask(32)), "mask", "requires init_image"),
    (dict(strength=0.5), "strength", "requires init_image"),
    (dict(task="txt2img", init_image=IMAGE), "init_image", "not txt2img"),
    (dict(task="paint", init_image=IMAGE), "task", "must be one of"),
    (dict(task="inpaint", init_image=IMAGE), "mask", "is required for task inpaint"),
    (dict(task="img2img", init_image=IMAGE, mask=half_mask(32)), "mask", "not used by task img2img"),
    (dict(init_image=IMAGE, strength=0.0), "strength", "(0, 1]"),
    (dict(init_image=IMAGE, strength=1.5), "strength", "(0, 1]"),
    (dict(init_image=IMAGE, strength=0.05, steps=10), "strength", "leaves no denoising step"),
    (dict(init_image=IMAGE, mask=half_mask(48)), "mask", "of init_image's size [32, 32]"),
    (dict(init_image=photo(36, 0)), "init_image", "multiples of 8"),
    (dict(init_image=IMAGE, height=48), "height", "must be 32"),
    (dict(init_image=IMAGE, mask=half_mask(32), mask_blur=100), "mask_blur", "[0, 64]"),
    (dict(init_image=IMAGE, keep_unmasked=True), "keep_unmasked", "not used by task img2img"),
    (dict(init_image=IMAGE.astype(np.float32)), "init_image", "must be UINT8 [N, N, 3], got float32"),
    (dict(init_image=IMAGE, mask=half_mask(32)[..., None]), "mask", "must be UINT8 [N, N], got uint8 [32, 32, 1]"),
]
BAD_BASE_ONLY = [(dict(task="upscale", init_image=LOW_RES), "task", "upscale needs the upscale variant")]
BAD_VARIANTS = [
    (dict(task="upscale", init_image=LOW_RES, noise_level=400), "noise_level", "[0, 350]"),
    (dict(task="upscale", init_image=photo(9, 0)), "init_image", "multiples of 2"),
    (dict(task="upscale", init_image=LOW_RES, strength=0.5), "strength", "not used by task upscale"),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("which", ["server", "variant_server"])
def test_bad_combinations_are_named_then_the_server_keeps_serving(request, which, protocol):
    server = request.getfixturevalue(which)
    cases = BAD + (BAD_VARIANTS if which == "variant_server" else BAD_BASE_ONLY)
    with LdmClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol) as client:
        for fields, name, expected in cases:
            with pytest.raises(InferenceServerException) as info:
                client.generate(PROMPT, **{"steps": 2, **fields})
            assert info.value.status() == "INVALID_ARG", (fields, info.value)
            assert info.value.message().startswith(f"{name}: ") and expected in info.value.message(), info.value
        assert client.generate(PROMPT, init_image=IMAGE, mask=half_mask(32), steps=2).shape == (32, 32, 3)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_itself_rejects_a_wrong_dtype_or_rank_naming_the_input(server, protocol):
    """A client other than LdmClient (which checks FIELDS before sending) reaches Triton's own
    validation of the declared dtype and rank."""
    module, url = (grpcclient, server.grpc_url) if protocol == "grpc" else (httpclient, server.http_url)
    client = module.InferenceServerClient(url)
    try:
        for name, value, dtype in (
            ("init_image", IMAGE.astype(np.float32), "FP32"),
            ("mask", half_mask(32)[None], "UINT8"),
        ):
            tensors = []
            for n, v, t in (
                ("prompt", np.array([b"a red circle"], object), "BYTES"),
                ("init_image", IMAGE, "UINT8"),
                (name, value, dtype),
            ):
                tensor = module.InferInput(n, list(v.shape), t)
                tensor.set_data_from_numpy(v)
                tensors.append(tensor)
            tensors = list({t.name(): t for t in tensors}.values())
            with pytest.raises(InferenceServerException) as info:
                client.infer("pipeline_unary", tensors)
            assert name in info.value.message(), info.value
    finally:
        client.close()
    with LdmClient(server.grpc_url) as healthy:
        assert healthy.generate(PROMPT, init_image=IMAGE, steps=2).shape == (32, 32, 3)


def test_ldm_generate_inpaints_an_image_of_your_own(server, tmp_path):
    Image.fromarray(IMAGE).save(tmp_path / "photo.png")
    Image.fromarray(half_mask(32)).save(tmp_path / "mask.png")
    outputs = []
    for protocol, url in (("kserve", server.grpc_url), ("kserve-http", server.http_url)):
        out = tmp_path / f"{protocol}.png"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "serving.cli",
                "generate",
                PROMPT,
                "-o",
                str(out),
                "--init-image",
                str(tmp_path / "photo.png"),
                "--mask",
                str(tmp_path / "mask.png"),
                "--strength",
                "0.8",
                "--seed",
                "5",
                "--steps",
                "6",
                "--protocol",
                protocol,
                "--url",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(np.asarray(Image.open(out)))
    assert outputs[0].shape == (32, 32, 3) and np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(outputs[0][:, :16], IMAGE[:, :16])  # the kept half is the input's
