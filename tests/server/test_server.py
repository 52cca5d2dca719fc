"""End to end with a real tritonserver on the tiny checkpoint."""

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serving.client.kserve import LdmClient
from serving.core.sampler import noise_generator

PROMPT = "a large red circle on the left"


@pytest.fixture
def grpc(server):
    with LdmClient(server.grpc_url, "grpc") as client:
        yield client


@pytest.fixture
def http(server):
    with LdmClient(server.http_url, "http") as client:
        yield client


def test_image_over_grpc_and_http(grpc, http):
    a = grpc.run(PROMPT, seed=11, steps=6)
    b = http.run(PROMPT, seed=11, steps=6)
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8
    assert a.seed == b.seed == 11
    np.testing.assert_array_equal(a.image, b.image)


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(grpc):
    first = grpc.generate(PROMPT, seed=3, steps=5, height=48, width=64)
    second = grpc.generate(PROMPT, seed=3, steps=5, height=48, width=64)
    other = grpc.generate(PROMPT, seed=4, steps=5, height=48, width=64)
    assert first.shape == (48, 64, 3)
    assert first.tobytes() == second.tobytes()
    assert first.tobytes() != other.tobytes()


def test_unary_grpc_call(server):
    with LdmClient(server.grpc_url, "grpc", unary=True) as client:
        assert client.generate(PROMPT, seed=1, steps=3).shape == (32, 32, 3)


def test_served_image_matches_diffusers_pipeline(grpc, tiny_checkpoint):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_checkpoint)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for seed, guidance in ((21, 5.0), (22, 1.0)):
        served = grpc.generate(PROMPT, negative_prompt="blue", seed=seed, steps=12, guidance_scale=guidance, eta=0.0)
        latents = noise_generator(seed).standard_normal((4, 8, 8), dtype=np.float32)[None]
        reference = pipe(
            PROMPT,
            negative_prompt="blue",
            num_inference_steps=12,
            guidance_scale=guidance,
            height=32,
            width=32,
            eta=0.0,
            latents=torch.from_numpy(latents),
            output_type="np",
        ).images[0]
        reference = (reference * 255).round().astype(np.uint8)
        diff = np.abs(served.astype(int) - reference.astype(int)).mean() / 255
        assert diff <= 2 / 255, f"seed {seed}: mean abs pixel difference {diff * 255:.3f}/255"


BAD_FIELDS = [
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": "red " * 40}, "prompt", "at most 16 tokens"),
    ({"negative_prompt": "blue " * 40}, "negative_prompt", "at most 16 tokens"),
    ({"steps": 0}, "steps", "[1, 150]"),
    ({"steps": 151}, "steps", "[1, 150]"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "finite number in [0.0, 50.0]"),
    ({"guidance_scale": float("inf")}, "guidance_scale", "finite number"),
    ({"guidance_scale": -1.0}, "guidance_scale", "[0.0, 50.0]"),
    ({"height": 36}, "height", "multiple of 8"),
    ({"width": 72}, "width", "[8, 64]"),
    ({"eta": 1.5}, "eta", "[0.0, 1.0]"),
    ({"seed": -1}, "seed", "[0, "),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_fields_are_named_then_server_keeps_serving(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with LdmClient(url, protocol) as client:
        for overrides, field, expected in BAD_FIELDS:
            fields = {"prompt": PROMPT, "steps": 2, **overrides}
            with pytest.raises(InferenceServerException) as info:
                client.generate(**fields)
            assert info.value.status() == "INVALID_ARG", (overrides, info.value)
            assert info.value.message().startswith(f"{field}:") and expected in info.value.message(), info.value
        assert client.generate(PROMPT, steps=2).shape == (32, 32, 3)


def _raw_infer(server, inputs):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensors = []
        for name, value, dtype in inputs:
            tensor = grpcclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return client.infer("pipeline_unary", tensors)
    finally:
        client.close()


@pytest.mark.parametrize(
    "inputs, expected",
    [
        ([("steps", np.array([2], np.int32), "INT32")], "prompt"),  # missing required input
        ([("prompt", np.array([b"x"], object), "BYTES"), ("steps", np.array([2.0], np.float32), "FP32")], "steps"),
        ([("prompt", np.array([b"x", b"y"], object), "BYTES")], "prompt"),  # wrong shape
    ],
    ids=["missing-prompt", "wrong-dtype", "wrong-shape"],
)
def test_malformed_requests_are_rejected_with_the_input_named(server, inputs, expected):
    with pytest.raises(InferenceServerException) as info:
        _raw_infer(server, inputs)
    assert "INVALID_ARGUMENT" in str(info.value.status()), info.value
    assert expected in info.value.message()
    good = _raw_infer(
        server, [("prompt", np.array([b"a red circle"], object), "BYTES"), ("steps", np.array([2], np.int32), "INT32")]
    )
    assert good.as_numpy("image").shape == (32, 32, 3)
