"""Regional prompts through a real tritonserver (tiny checkpoint): every bad combination named
over gRPC and HTTP, bit-identical bytes alone and in a crowd, and the regional UNet over BLS."""

from concurrent.futures import ThreadPoolExecutor
import shutil
import threading

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from export.cli import pipeline_parameters
from export.repository import write_pipeline_config
from serving.client.kserve import LdmClient

BASE = "a red circle to the left of a blue square"
TWO = ["a small red circle on the left", "a blue square on the right"]
FULL = np.full((2, 32, 32), 255, np.uint8)

BAD = [
    (dict(region_prompts=TWO), "region_divisions", "need region_divisions or region_masks"),
    (dict(region_prompts=TWO, region_divisions="1,1,1"), "region_divisions", "makes 3 regions"),
    (dict(region_prompts=TWO, region_divisions="1,a"), "region_divisions", "not a positive number"),
    (dict(region_prompts=TWO, region_divisions="1,1", region_masks=FULL), "region_masks", "not both"),
    (dict(region_prompts=TWO, region_masks=FULL[:, :16]), "region_masks", "shape [2, 32, 32]"),
    (dict(region_prompts=TWO, region_masks=np.zeros((2, 32, 32), np.uint8)), "region_masks", "region 0 is empty"),
    (dict(region_prompts=["a"] * 9, region_divisions="1,1"), "region_prompts", "1 to 8 texts"),
    (dict(region_prompts=["a", ""], region_divisions="1,1"), "region_prompts", "text 1 must not be empty"),
    (dict(region_prompts=["a", "red " * 20], region_divisions="1,1"), "region_prompts[1]", "at most 16 tokens"),
    (
        dict(region_prompts=TWO, region_divisions="1,1", region_negative_prompts=["x"]),
        "region_negative_prompts",
        "one text per region",
    ),
    (dict(region_prompts=TWO, region_divisions="1,1", base_prompt_weight=2.0), "base_prompt_weight", "[0.0, 1.0]"),
    (dict(region_prompts=TWO, region_divisions="1,1", region_mode="pixel"), "region_mode", "latent, attention"),
    (dict(region_divisions="1,1"), "region_divisions", "needs region_prompts"),
    (dict(region_mode="latent"), "region_mode", "needs region_prompts"),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_region_combinations_are_named_then_server_keeps_serving(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with LdmClient(url, protocol) as client:
        for fields, field, expected in BAD:
            with pytest.raises(InferenceServerException) as info:
                client.generate(BASE, steps=2, **fields)
            assert info.value.status() == "INVALID_ARG", (fields, info.value)
            assert info.value.message().startswith(f"{field}: ") and expected in info.value.message(), info.value
        assert client.generate(BASE, steps=2, region_prompts=TWO, region_divisions="1,1").shape == (32, 32, 3)


def test_masks_and_divisions_give_the_same_image_over_grpc_and_http(server):
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[0, :, :16], masks[1, :, 16:] = 255, 255
    fields = dict(seed=4, steps=6, region_prompts=TWO)
    with LdmClient(server.grpc_url) as grpc, LdmClient(server.http_url, "http") as http:
        by_division = grpc.generate(BASE, region_divisions="1,1", **fields)
        by_mask = http.generate(BASE, region_masks=masks, **fields)
    np.testing.assert_array_equal(by_division, by_mask)


@pytest.mark.parametrize("mode", ["latent", "attention"])
def test_served_regional_image_is_bit_identical_alone_and_in_a_crowd_of_plain_requests(server, mode):
    target = dict(
        prompt=BASE, seed=77, steps=15, guidance_scale=5.0, region_prompts=TWO, region_divisions="1,1", region_mode=mode
    )
    crowd = [
        dict(prompt=p, seed=i, steps=s, guidance_scale=g)
        # long enough (tiny steps take milliseconds) to overlap the target on any machine
        for i, (p, s, g) in enumerate(
            [
                ("a blue square", 130, 7.5),
                ("a green star", 125, 1.0),
                ("a yellow circle", 140, 3.0),
                ("two cats", 135, 5.0),
                ("a white circle", 130, 9.0),
                ("a black square", 128, 5.0),
            ]
        )
    ]
    with LdmClient(server.grpc_url) as client:
        alone = client.generate(**target)
    started = threading.Barrier(len(crowd) + 1)

    def one(fields, progress=False):
        with LdmClient(server.grpc_url) as client:
            if not progress:
                return client.generate(**fields)
            # the target is sent once every crowd request has reported its first step
            return client.run(
                **fields, progress_every=1, on_progress=lambda g: len(g.progress) == 1 and started.wait(timeout=120)
            ).image

    with ThreadPoolExecutor(len(crowd) + 1) as pool:
        futures = [pool.submit(one, fields, True) for fields in crowd]
        started.wait(timeout=120)
        together = pool.submit(one, target).result()
        assert all(f.result().shape == (32, 32, 3) for f in futures)
    np.testing.assert_array_equal(together, alone)


@pytest.fixture(scope="module")
def bls_server(tiny_repo, tmp_path_factory, triton_servers):
    """The tiny model with the UNets reached over BLS (Triton models unet and unet_regional)."""
    repo = tmp_path_factory.mktemp("bls") / "repo"
    shutil.copytree(tiny_repo, repo)
    write_pipeline_config(repo, pipeline_parameters(unet="bls"))
    with triton_servers.running(repo, "tritonserver-bls") as server:
        yield server


def test_attention_mode_over_bls_gives_the_in_process_bytes(server, bls_server):
    fields = dict(
        seed=12,
        steps=8,
        region_prompts=["a cat", "a dog", "a horse"],
        region_divisions="1,2;1,1,1",
        region_mode="attention",
    )
    with LdmClient(server.grpc_url) as inprocess, LdmClient(bls_server.grpc_url) as bls:
        np.testing.assert_array_equal(bls.generate(BASE, **fields), inprocess.generate(BASE, **fields))


@pytest.mark.parametrize("protocol", ["gateway", "kserve"])
def test_ldm_generate_with_regions_by_division_and_by_mask(server, gateway, protocol, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    masks = []
    for i in range(2):
        mask = np.zeros((32, 32), np.uint8)
        mask[:, 16 * i : 16 * (i + 1)] = 255
        masks.append(tmp_path / f"mask{i}.png")
        Image.fromarray(mask).save(masks[-1])
    url = gateway.grpc_url if protocol == "gateway" else server.grpc_url
    common = [
        sys.executable,
        "-m",
        "serving.cli",
        "generate",
        BASE,
        "--seed",
        "3",
        "--steps",
        "5",
        "--protocol",
        protocol,
        "--url",
        url,
        "--region",
        TWO[0],
        "--region",
        TWO[1],
    ]
    for name, extra in (
        ("divide", ["--divide", "1,1"]),
        ("mask", ["--region-mask", str(masks[0]), "--region-mask", str(masks[1])]),
    ):
        done = subprocess.run(
            common + extra + ["-o", str(tmp_path / f"{name}.png")], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    with LdmClient(server.grpc_url) as client:
        expected = client.generate(BASE, seed=3, steps=5, region_prompts=TWO, region_divisions="1,1")
    for name in ("divide", "mask"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{name}.png")), expected)
    bad = subprocess.run(common + ["--divide", "1,1,1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and ("INVALID_ARG" in bad.stderr or "INVALID_ARGUMENT" in bad.stderr), bad.stderr
    assert "region_divisions" in bad.stderr, bad.stderr
