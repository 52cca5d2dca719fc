"""The gateway's REST front with the real `openai` SDK (images.generate, streaming, images.edit)
and plain HTTP: OpenAI's shapes, our extension fields, errors naming the field, the OpenAPI
document and its page, request ids, and a disconnect cancelling the generation."""

import base64
import io
import json
import re
import socket
import urllib.error
import urllib.request

import numpy as np
import openai
from PIL import Image as PILImage
import pytest

from serving.client.kserve import LdmClient
from tests.support.server_metrics import idle_metrics, metrics, wait_for

PROMPT = "a small green square at the top"


@pytest.fixture
def sdk(gateway):
    with openai.OpenAI(base_url=gateway.rest_url + "/v1", api_key="unused-without-keys", max_retries=0) as client:
        yield client


def pixels(b64: str) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def post(gateway, path, body: dict, headers=None):
    request = urllib.request.Request(
        gateway.rest_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_sdk_generate_gives_tritons_images_with_our_extension_fields(sdk, server):
    result = sdk.images.generate(
        model="tiny",
        prompt=PROMPT,
        n=2,
        size="32x48",
        response_format="b64_json",
        output_format="png",
        extra_body={"seed": 11, "steps": 4, "guidance_scale": 3.0},
    )
    assert len(result.data) == 2 and result.size == "32x48" and result.output_format == "png"
    with LdmClient(server.grpc_url) as kserve:
        for i, image in enumerate(result.data):
            expected = kserve.generate(PROMPT, seed=11 + i, steps=4, guidance_scale=3.0, height=48, width=32)
            np.testing.assert_array_equal(pixels(image.b64_json), expected)


def test_sdk_streaming_sends_partial_images_then_completed(sdk, server):
    stream = sdk.images.generate(
        prompt=PROMPT, stream=True, partial_images=2, size="32x32", extra_body={"seed": 5, "steps": 6}
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert pixels(events[0].b64_json).shape == (32, 32, 3)
    with LdmClient(server.grpc_url) as kserve:
        np.testing.assert_array_equal(pixels(events[-1].b64_json), kserve.generate(PROMPT, seed=5, steps=6))


def test_sdk_edit_repaints_the_transparent_pixels_and_keeps_the_others(sdk):
    # OpenAI's semantics: the image's transparent pixels are repainted, the opaque ones kept
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :16, 3] = 255  # left half opaque red, right half transparent
    picture = io.BytesIO()
    PILImage.fromarray(rgba, "RGBA").save(picture, format="PNG")
    result = sdk.images.edit(
        image=("in.png", picture.getvalue(), "image/png"),
        prompt=PROMPT,
        size="32x32",
        extra_body={"seed": 3, "steps": 4},
    )
    edited = pixels(result.data[0].b64_json)
    assert edited.shape == (32, 32, 3)
    kept = edited[:, :8]  # far from the mask's (blurred) edge: pasted back exactly
    np.testing.assert_array_equal(kept, np.broadcast_to(np.array([255, 0, 0], np.uint8), kept.shape))
    assert not np.array_equal(edited[:, 24:], np.broadcast_to(np.array([255, 0, 0], np.uint8), (32, 8, 3)))


def test_sdk_edit_is_the_grpc_fronts_img2img_for_the_same_image_and_seed(sdk, gateway):
    from serving.client.images import ImagesClient

    picture = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        picture, format="PNG"
    )
    result = sdk.images.edit(
        image=("in.png", picture.getvalue(), "image/png"),
        prompt=PROMPT,
        size="32x32",
        extra_body={"seed": 9, "steps": 4, "strength": 0.7},
    )
    with ImagesClient(gateway.grpc_url) as client:
        (expected,) = client.generate(PROMPT, seed=9, steps=4, strength=0.7, init_image=picture.getvalue())
    np.testing.assert_array_equal(pixels(result.data[0].b64_json), expected.array())


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"steps": 0}, "steps", "[1, 150]"),
        ({"size": "36x32"}, "size", "multiple of 8"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"n": 9}, "n", "[1, 8]"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"colour": "red"}, "colour", "unknown parameter"),
        ({"guidance_scale": "high"}, "guidance_scale", "number"),
        ({"partial_images": 2}, "partial_images", "stream"),
    ],
)
def test_bad_requests_are_400_in_openais_shape_naming_the_param(gateway, body, param, text):
    status, headers, answer = post(gateway, "/v1/images/generations", {"prompt": PROMPT, "steps": 2, **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param and text in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert headers["X-Request-Id"]


def test_sdk_raises_bad_request_with_the_param(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt=PROMPT, extra_body={"steps": 0})
    assert info.value.body["param"] == "steps"


def test_request_id_header_is_echoed_or_made(gateway):
    status, headers, _ = post(
        gateway, "/v1/images/generations", {"prompt": PROMPT, "steps": 2}, {"X-Request-Id": "abc-123"}
    )
    assert status == 200 and headers["X-Request-Id"] == "abc-123"
    _, headers, _ = post(gateway, "/v1/images/generations", {"prompt": PROMPT, "steps": 2}, {"X-Request-Id": "bad id!"})
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-Id"])


def test_openapi_document_and_its_page_need_nothing_from_elsewhere(gateway):
    spec = json.loads(urllib.request.urlopen(gateway.rest_url + "/openapi.json").read())
    assert spec["openapi"].startswith("3.")
    body = spec["components"]["schemas"]["GenerationsRequest"]
    assert body["required"] == ["prompt"] and {"n", "size", "stream", "partial_images", "seed", "steps"} <= set(
        body["properties"]
    )
    assert "image" in spec["components"]["schemas"]["EditsRequest"]["properties"]
    page = urllib.request.urlopen(gateway.rest_url + "/docs").read().decode()
    assert "/openapi.json" in page
    # no script, style, image or font from another origin
    assert (
        not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page and "url(" not in page
    )


def test_requests_with_the_same_request_id_run_side_by_side(gateway, server):
    """A client's X-Request-Id begins the Triton ids but does not make them: the pipeline
    refuses an id already running, so a shared one would fail the second request."""
    before = idle_metrics(server)
    body = json.dumps({"prompt": PROMPT, "steps": 150, "size": "64x64"}).encode()
    host, port = gateway.rest_url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    try:
        connection.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: same-id\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        assert wait_for(lambda: metrics(server)["ldm_active_requests"] >= 1)
        status, headers, answer = post(
            gateway, "/v1/images/generations", {"prompt": PROMPT, "steps": 2}, {"X-Request-Id": "same-id"}
        )
        assert status == 200 and headers["X-Request-Id"] == "same-id", answer
    finally:
        connection.close()  # cancels the long one
    assert wait_for(lambda: metrics(server)["ldm_active_requests"] == 0)
    assert metrics(server)["ldm_cancellations_total"] == before["ldm_cancellations_total"] + 1


def test_a_client_that_disconnects_cancels_its_generation(gateway, server):
    before = idle_metrics(server)
    body = json.dumps({"prompt": PROMPT, "steps": 150, "n": 2, "size": "64x64"}).encode()
    host, port = gateway.rest_url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)))
    connection.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    assert wait_for(lambda: metrics(server)["ldm_active_requests"] >= 1)
    connection.close()
    assert wait_for(lambda: metrics(server)["ldm_cancellations_total"] == before["ldm_cancellations_total"] + 2)
    assert wait_for(lambda: metrics(server)["ldm_active_requests"] == 0)
