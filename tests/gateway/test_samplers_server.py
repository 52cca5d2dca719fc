"""Samplers through the real gateway and tritonserver (the tiny checkpoint): a sampler picked by
its A1111 name over REST (the `openai` SDK) is the same image as by our name over gRPC; unknown
or unfitting names are refused naming `sampler`; GET /v1/samplers and ListSamplers list them;
guidance intervals pass through; and 8 requests with 8 samplers and step counts, each joining
while the others run, give each the bytes it gets alone."""

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
from PIL import Image as PILImage
import pytest

from serving.client.images import Image, ImagesClient, ImagesError
from serving.client.kserve import LdmClient

PROMPT = "a small green square at the top"
SAMPLER_NAMES = ["ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm", "flow_match_euler"]


@pytest.fixture
def sdk(gateway):
    with openai.OpenAI(base_url=gateway.rest_url + "/v1", api_key="unused-without-keys", max_retries=0) as client:
        yield client


@pytest.fixture
def client(gateway):
    with ImagesClient(gateway.grpc_url) as c:
        yield c


def get(gateway, path):
    try:
        with urllib.request.urlopen(gateway.rest_url + path, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_an_a1111_name_over_rest_is_our_name_over_grpc(sdk, client):
    result = sdk.images.generate(
        prompt=PROMPT,
        size="32x32",
        output_format="png",
        extra_body={"sampler": "DPM++ 2M Karras", "steps": 10, "seed": 7},
    )
    (image,) = client.generate(
        PROMPT, seed=7, steps=10, height=32, width=32, sampler="dpmpp_2m", sigma_schedule="karras"
    )
    assert base64.b64decode(result.data[0].b64_json) == image.data
    (ddim,) = client.generate(PROMPT, seed=7, steps=10, height=32, width=32, sampler="ddim")
    assert ddim.data != image.data  # the sampler changed the image


def test_sampler_fields_reach_the_pipeline_as_triton_clients_send_them(client, sdk, server):
    fields = dict(sampler="euler_ancestral", guidance_interval=[0.2, 0.8], guidance_scale=4.0)
    (image,) = client.generate(PROMPT, seed=3, steps=6, **fields)
    with LdmClient(server.grpc_url) as kserve:
        expected = kserve.generate(PROMPT, seed=3, steps=6, **dict(fields, guidance_interval=np.float32([0.2, 0.8])))
    np.testing.assert_array_equal(image.array(), expected)
    result = sdk.images.generate(prompt=PROMPT, extra_body={"seed": 3, "steps": 6, **fields})
    assert base64.b64decode(result.data[0].b64_json) == image.data
    (whole,) = client.generate(PROMPT, seed=3, steps=6, sampler="euler_ancestral", guidance_scale=4.0)
    assert whole.data != image.data  # the interval changed the image


def test_an_edit_takes_a_sampler_and_an_interval_in_its_form(sdk, client):
    """/v1/images/edits is multipart: the SDK sends a list as the field repeated (`name[]`)."""
    picture = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        picture, format="PNG"
    )
    fields = dict(seed=4, steps=6, strength=0.7, sampler="Euler a", guidance_interval=[0.1, 0.7])
    result = sdk.images.edit(
        image=("in.png", picture.getvalue(), "image/png"), prompt=PROMPT, size="32x32", extra_body=fields
    )
    (expected,) = client.generate(PROMPT, init_image=picture.getvalue(), **fields)
    assert base64.b64decode(result.data[0].b64_json) == expected.data


def test_unknown_and_unfitting_samplers_are_refused_naming_the_field(sdk, client):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt=PROMPT, extra_body={"sampler": "DPM++ 3M", "steps": 4})
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == "sampler" and error["code"] == "invalid_arg"
    assert "DPM++ 3M" in error["message"] and "dpmpp_2m" in error["message"] and "Euler a" in error["message"]
    with pytest.raises(ImagesError) as grpc_info:
        client.generate(PROMPT, seed=1, steps=4, sampler="DPM++ 3M")
    assert (grpc_info.value.code, grpc_info.value.field) == ("INVALID_ARGUMENT", "sampler")
    assert "dpmpp_2m" in grpc_info.value.message
    # flow matching on the tiny epsilon/v checkpoint
    with pytest.raises(ImagesError) as unfit:
        client.generate(PROMPT, seed=1, steps=4, sampler="flow_match_euler")
    assert (unfit.value.code, unfit.value.field) == (
        "INVALID_ARGUMENT",
        "sampler",
    ) and "does not fit" in unfit.value.message
    with pytest.raises(openai.BadRequestError) as bad_schedule:
        sdk.images.generate(prompt=PROMPT, extra_body={"sampler": "ddim", "sigma_schedule": "karras", "steps": 4})
    assert bad_schedule.value.body["param"] == "sigma_schedule"
    for interval in ([0.8, 0.2], [0.5]):
        with pytest.raises(openai.BadRequestError) as bad_interval:
            sdk.images.generate(prompt=PROMPT, extra_body={"guidance_interval": interval, "steps": 4})
        assert bad_interval.value.body["param"] == "guidance_interval"


def test_v1_samplers_lists_them_in_openais_list_shape(gateway):
    status, listed = get(gateway, "/v1/samplers")
    assert status == 200 and listed["object"] == "list"
    assert [s["name"] for s in listed["data"]] == SAMPLER_NAMES
    fits = {s["name"]: s["fits_served_model"] for s in listed["data"]}
    assert fits == {name: name != "flow_match_euler" for name in SAMPLER_NAMES}
    for entry in listed["data"]:
        assert (
            entry["object"] == "sampler" and entry["description"] and entry["fits"] and "steps" in entry["parameters"]
        )
    by_name = {s["name"]: s for s in listed["data"]}
    assert by_name["euler_ancestral"]["a1111_names"] == ["Euler a"]
    assert (
        "DPM++ 2M Karras" in by_name["dpmpp_2m"]["a1111_names"] and "karras" in by_name["dpmpp_2m"]["sigma_schedules"]
    )
    assert (listed["default_sampler"], listed["default_sigma_schedule"]) == (
        "ddim",
        "default",
    )  # a DDIMScheduler checkpoint
    status, document = get(gateway, "/openapi.json")
    assert "/v1/samplers" in document["paths"]
    for route in ("GenerationsRequest", "EditsRequest", "LiveGenerationRequest"):
        properties = document["components"]["schemas"][route]["properties"]
        assert {"sampler", "sigma_schedule", "guidance_interval"} <= set(properties), route


def test_list_samplers_over_grpc_is_the_rest_list(client, gateway):
    listed = client.samplers()
    _, rest = get(gateway, "/v1/samplers")
    assert listed == [{k: v for k, v in entry.items() if k != "object"} for entry in rest["data"]]


def test_a_live_generation_takes_a_sampler(gateway, client):
    body = {
        "prompt": PROMPT,
        "seed": 5,
        "steps": 5,
        "sampler": "UniPC",
        "guidance_interval": [0, 0.6],
        "preview_every": 0,
    }
    request = urllib.request.Request(
        gateway.rest_url + "/v1/generations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        events = response.read().decode()
    completed = [
        json.loads(line[len("data: ") :])
        for line in events.splitlines()
        if line.startswith("data: ") and '"b64_json"' in line
    ]
    (image,) = client.generate(PROMPT, seed=5, steps=5, sampler="unipc", guidance_interval=[0, 0.6])
    assert base64.b64decode(completed[0]["b64_json"]) == image.data


# 8 requests, 8 samplers / schedules / step counts; the longest first, so that each later one
# joins while the earlier ones still run
MIXED = [
    dict(sampler="ddim", steps=48),
    dict(sampler="Euler a", steps=40),
    dict(sampler="dpmpp_2m", sigma_schedule="karras", steps=34),
    dict(sampler="euler", steps=30, guidance_interval=[0.3, 0.9]),
    dict(sampler="dpmpp_2m_sde", steps=26),
    dict(sampler="UniPC", steps=22),
    dict(sampler="euler", sigma_schedule="karras", steps=18),
    dict(sampler="lcm", steps=8),
]


def test_eight_samplers_joining_mid_run_each_give_what_they_give_alone(gateway):
    alone = {}
    with ImagesClient(gateway.grpc_url) as client:
        for i, fields in enumerate(MIXED):
            (image,) = client.generate(PROMPT, seed=100 + i, guidance_scale=4.0, **fields)
            alone[i] = image.data
    assert len(set(alone.values())) == len(MIXED)

    started = [threading.Event() for _ in MIXED]
    results, finished_at, first_step_at, errors = {}, {}, {}, []

    def run(i, fields):
        try:
            with ImagesClient(gateway.grpc_url) as client:
                for event in client.stream(PROMPT, seed=100 + i, guidance_scale=4.0, **fields):
                    if isinstance(event, Image):
                        results[i], finished_at[i] = event.data, time.monotonic()
                    elif i not in first_step_at:
                        first_step_at[i] = time.monotonic()
                        started[i].set()
        except Exception as exc:  # reported below
            errors.append((i, exc))
        finally:
            started[i].set()

    threads = []
    for i, fields in enumerate(MIXED):
        thread = threading.Thread(target=run, args=(i, fields), daemon=True)
        thread.start()
        threads.append(thread)
        assert started[i].wait(120), f"request {i} made no progress"
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    # each later request took its first step while the first ones were still running
    assert first_step_at[len(MIXED) - 1] < finished_at[0], "the last request did not join the first mid-run"
    assert first_step_at[len(MIXED) - 1] < finished_at[1]
    for i in range(len(MIXED)):
        assert results[i] == alone[i], f"request {i} {MIXED[i]} differs from itself alone"
